"""The tier queues of one server process, in its memory (the default).

One deque per tier. Admission applies the zones before a request is queued, so a shed
request costs almost nothing. A GPU that becomes free calls :meth:`MemoryQueue.next_batch`,
which holds the assembly lock and sleeps until the dispatch decision says a batch is
due (a full queue wakes it early); the GPU that has been idle longest therefore gets
the next batch. Each request carries a future; delivery resolves future *i* with
output *i* on the client's still-open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...core.admission import zone_admits
from ...core.dispatch import Take, decide, take_by_priority
from ...core.model import Batching, ServiceModel
from ...core.tiers import Tier
from ..api_errors import ApiError
from ..backends.base import Generate, Generated
from .queue import Interrupted, TierQueue

__all__ = ["MemoryQueue", "Pending", "WaitingRoom"]


@dataclass(slots=True)
class Pending:
    """One admitted request waiting for its output."""

    request: Generate
    tier: int
    arrived: float  # loop.time() at arrival
    future: asyncio.Future[Generated] = field(repr=False)
    ready: float | None = None  # when an engine's front end lets it be scheduled, once a backend has worked it out


class WaitingRoom:
    """Requests waiting by tier, FIFO within a tier, for the GPU workers that admit from it one at a time
    (continuous batching): the process's whole queue, or, with routing, one worker's own
    (:class:`~.routed_queue.RoutedQueue`). Counts are kept on the owning queue, which judges the zones."""

    def __init__(self, owner: MemoryQueue) -> None:
        self.owner = owner
        self.tiers: list[deque[Pending]] = [deque() for _ in Tier]

    def __len__(self) -> int:
        return sum(len(q) for q in self.tiers)

    def head(self) -> Pending | None:
        """The request a GPU with a free slot would admit next: by tier, FIFO within a tier."""
        self.drop_abandoned_heads()
        return next((q[0] for q in self.tiers if q), None)

    def pop_head(self) -> Pending:
        """Take the request :meth:`head` returned (call it in the same loop pass)."""
        self.owner._queued -= 1
        return next(q for q in self.tiers if q).popleft()

    def waiting(self) -> list[deque[Pending]]:
        """The waiting requests by tier, enterprise first, each tier oldest first: the candidates when some may not
        be admissible yet (an engine's front end still holds them)."""
        self.drop_abandoned_heads()
        return [q for q in self.tiers if q]

    def pop(self, pending: Pending) -> Pending:
        """Take ``pending``, one of :meth:`waiting` (call it in the same loop pass)."""
        self.owner._queued -= 1
        queue = self.tiers[pending.tier]
        if queue[0] is pending:
            return queue.popleft()
        queue.remove(pending)
        return pending

    def push_front(self, pending: Pending) -> None:
        """Back at the head of its tier (preempted by the engine: it was accepted, so the zones do not judge it)."""
        self.tiers[pending.tier].appendleft(pending)
        self.owner._queued += 1

    async def wait_work(self, interrupted: Interrupted) -> bool:
        """Until a request waits here (True) or ``interrupted()`` (False)."""
        while not interrupted():
            if self.head() is not None:
                return True
            self.owner._wake.clear()
            await self.owner._wake.wait()
        return False

    def drop_abandoned_heads(self) -> None:
        """Requests whose client gave up (timeout, disconnect) leave the queue without a batch slot."""
        for q in self.tiers:
            while q and q[0].future.done():
                q.popleft()
                self.owner._queued -= 1

    def fail(self, err: ApiError) -> None:
        for q in self.tiers:
            deliver_to_futures(list(q), err)
            self.owner._queued -= len(q)
            q.clear()


class MemoryQueue(TierQueue):
    def __init__(self, model: ServiceModel, gpus: int) -> None:
        self.model = model
        self.rule = model.dispatch_rule
        self.resize(gpus)
        # Continuous batching: a GPU with a free slot takes the next request at its next step, so
        # every arrival may be work for an idle GPU; a batch cycle only cares about the first and a full one.
        self.wake_at = 1 if model.batching is Batching.CONTINUOUS else self.rule.max_batch
        self.shared = WaitingRoom(self)
        self.tiers = self.shared.tiers
        self._queued = 0
        self._assembly = asyncio.Lock()
        self._wake = asyncio.Event()

    def room(self, gpu: int) -> WaitingRoom:
        """Where GPU worker ``gpu`` admits from under continuous batching: here, the one shared room."""
        return self.shared

    @property
    def queued(self) -> int:
        return self._queued

    async def depths(self) -> list[int]:
        return [len(q) for q in self.tiers]

    async def offer(self, request: Generate, tier: int) -> asyncio.Future[Generated] | None:
        if self.gpus == 0 or not zone_admits(tier, self._queued, self.thresholds):
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Generated] = loop.create_future()
        self.room_for(request).tiers[tier].append(Pending(request, tier, loop.time(), fut))
        self._queued += 1
        if self._queued == 1 or self._queued >= self.wake_at:
            self._wake.set()  # start the oldest-request clock, or a full batch is ready
        return fut

    def resize(self, gpus: int) -> None:
        self.gpus = gpus
        self.thresholds = self.model.backpressure.thresholds(gpus, self.model.batch_capacity)

    def wake(self) -> None:
        self._wake.set()

    def room_for(self, request: Generate) -> WaitingRoom:
        """The room an arriving request waits in: the shared one."""
        return self.shared

    def fail_waiting(self, err: ApiError) -> None:
        self.shared.fail(err)

    async def next_batch(self, interrupted: Interrupted) -> list[Pending] | None:
        async with self._assembly:
            loop = asyncio.get_running_loop()
            while not interrupted():
                self.shared.drop_abandoned_heads()
                now = loop.time()
                decision = decide(self.rule, self._queued, self._oldest(), now, gpu_free=True)
                if isinstance(decision, Take):
                    return self._take(decision.n)
                self._wake.clear()
                timeout = None if math.isinf(decision.until) else decision.until - now  # None: until woken
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            return None

    def _oldest(self) -> float:
        return min((q[0].arrived for q in self.tiers if q), default=float("inf"))

    def _take(self, n: int) -> list[Pending]:
        batch: list[Pending] = []
        for q, count in zip(self.tiers, take_by_priority([len(q) for q in self.tiers], n), strict=True):
            for _ in range(count):
                item = q.popleft()
                if not item.future.done():
                    batch.append(item)
        self._queued -= n
        return batch

    async def deliver(self, batch: Sequence[Pending], result: list[Generated] | ApiError) -> None:
        deliver_to_futures(batch, result)


def deliver_to_futures(batch: Sequence[Pending], result: list[Generated] | ApiError) -> None:
    """Resolve each waiting request's future with its output, or the batch's error (answered ones are skipped)."""
    if isinstance(result, ApiError):
        for item in batch:
            if not item.future.done():
                item.future.set_exception(result)
        return
    for item, output in zip(batch, result, strict=True):
        if not item.future.done():
            item.future.set_result(output)
