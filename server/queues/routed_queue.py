"""The tier queues with routing (SPEC section 13): each request waits in the room of the GPU worker chosen for it.

With ``routing = "shared_queue"`` (the default) every continuous GPU worker admits from
one room, as an engine's own scheduler would across its replicas if it could. A gateway
in front of separate engine replicas cannot: it must send each request to one of them at
arrival, and the request then waits there. This queue does that in the server, so its
``sim`` workers behave as the simulator's routed replicas, and an ``openai`` pool's
replicas are chosen as llm-d's scheduler chooses. The zones still judge the whole
process's waiting depth; the choice itself is :func:`~infer_plan.core.routing.choose_replica`,
asked by the pool (:class:`~infer_plan.server.workers.gpu_pool.GpuPool`), which knows what
each worker runs and holds.
"""

from __future__ import annotations

from collections.abc import Callable

from ...core.model import ServiceModel
from ..api_errors import ApiError
from ..backends.base import Generate
from .memory_queue import MemoryQueue, WaitingRoom

__all__ = ["RoutedQueue"]

Router = Callable[[Generate, dict[int, WaitingRoom]], int]  # the request, the open rooms -> the chosen worker


class RoutedQueue(MemoryQueue):
    """A :class:`MemoryQueue` whose continuous workers each admit from a room of their own."""

    def __init__(self, model: ServiceModel, gpus: int) -> None:
        super().__init__(model, gpus)
        self.rooms: dict[int, WaitingRoom] = {}
        self.router: Router | None = None  # set by the pool that owns the workers

    def room(self, gpu: int) -> WaitingRoom:
        """Worker ``gpu``'s room, opened when it first asks: it is then a choice for new requests (and for any
        left waiting while no worker served)."""
        if gpu not in self.rooms:
            self.rooms[gpu] = WaitingRoom(self)
            self._route_again(self.shared)
        return self.rooms[gpu]

    def close_room(self, gpu: int) -> None:
        """Worker ``gpu`` retires: nothing new is sent to it, and what waits in its room is routed again, so no
        accepted request is lost with it (with no room left, the shared one keeps them until a worker comes or
        :meth:`fail_waiting`)."""
        room = self.rooms.pop(gpu, None)
        if room is not None:
            self._route_again(room)

    def _route_again(self, room: WaitingRoom) -> None:
        """Each request waiting in ``room`` to the room chosen now, in tier and arrival order."""
        for q in room.tiers:
            waiting = list(q)
            q.clear()
            for pending in waiting:
                self.room_for(pending.request).tiers[pending.tier].append(pending)
        self.wake()

    def room_for(self, request: Generate) -> WaitingRoom:
        if not self.rooms or self.router is None:
            return self.shared
        return self.rooms[self.router(request, self.rooms)]

    async def depths(self) -> list[int]:
        rooms = [self.shared, *self.rooms.values()]
        return [sum(len(room.tiers[t]) for room in rooms) for t in range(len(self.tiers))]

    def fail_waiting(self, err: ApiError) -> None:
        for room in [self.shared, *self.rooms.values()]:
            room.fail(err)
