"""Continuous batching in the server (SPEC section 10): a GPU admits waiting requests between steps.

With ``batching = "continuous"`` there is no batch to form: a GPU worker hands the
tier queue to the backend as a :class:`StepFeed`, and the backend admits the next
waiting request (by tier, FIFO within a tier) whenever it has room, answering each
request as its sequence ends. The sim backend runs the step model in real time
(``SimBackend.run_continuous``); an engine that batches continuously itself (vLLM's
scheduler, an upstream server) gets each request as soon as a slot is free, up to
``max_num_seqs`` per GPU worker (:func:`pass_through`), and does its own steps.

Only the in-process queue serves this mode: the shared Redis queue hands out whole
batches, so ``serve --redis`` with continuous batching is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

from ..api_errors import ApiError
from ..backends.base import Generated
from ..queues.memory_queue import MemoryQueue, Pending, deliver_to_futures
from ..queues.queue import Interrupted

RunBatch = Callable[[list[Pending]], Awaitable[list[Generated]]]  # raises the ApiError every request of it gets

__all__ = ["StepFeed", "pass_through"]


class StepFeed:
    """One GPU's view of the tier queue under continuous batching (its own room when routed); counts what runs
    for the drain and /metrics."""

    def __init__(
        self, queue: MemoryQueue, gpu: int, interrupted: Interrupted, closed: Interrupted = lambda: False
    ) -> None:
        self.gpu = gpu
        self.room = queue.room(gpu)
        self.interrupted = interrupted
        self.closed = closed  # True: the GPU retires; it admits nothing more and finishes what it runs
        self.running = 0
        self.held: dict[int, Pending] = {}  # admitted and not yet answered: what a crashed step loop leaves

    def head(self) -> Pending | None:
        return None if self.closed() else self.room.head()

    def take(self, pending: Pending | None = None) -> Pending:
        """Admit the head (or ``pending``, one of :meth:`waiting`): it holds a sequence slot until :meth:`deliver`."""
        self.running += 1
        taken = self.room.pop_head() if pending is None else self.room.pop(pending)
        self.held[id(taken)] = taken
        return taken

    def waiting(self) -> list[deque[Pending]]:
        return [] if self.closed() else self.room.waiting()

    async def wait(self) -> bool:
        """Until a request waits (True), or the worker is wanted for something else (False: return when idle)."""
        return await self.room.wait_work(self.interrupted)

    def put_back(self, pending: Pending) -> None:
        """A running request preempted by the engine (paged KV): it frees its slot and waits at the head of its
        tier again."""
        self.running -= 1
        del self.held[id(pending)]
        self.room.push_front(pending)

    def deliver(self, pending: Pending, result: Generated | ApiError) -> None:
        self.running -= 1
        del self.held[id(pending)]
        deliver_to_futures([pending], result if isinstance(result, ApiError) else [result])

    def fail_held(self, error: ApiError) -> int:
        """Answer every admitted request ``error`` (the engine's step loop died under them); how many."""
        held = list(self.held.values())
        for pending in held:
            self.deliver(pending, error)
        return len(held)


async def pass_through(run: RunBatch, feed: StepFeed, max_seqs: int) -> None:
    """Each request to the engine as soon as one of ``max_seqs`` slots is free, as a batch of one; the engine steps.

    ``run`` is the pool's own batch runner, so timeouts and engine faults are answered and
    counted exactly as for a batch.
    """
    slots = asyncio.Semaphore(max_seqs)
    tasks: set[asyncio.Task] = set()

    async def one(pending: Pending) -> None:
        try:
            feed.deliver(pending, (await run([pending]))[0])
        except ApiError as err:
            feed.deliver(pending, err)
        finally:
            slots.release()

    try:
        while True:
            await slots.acquire()
            if not await feed.wait():  # wanted for something else: finish what runs, then hand the GPU back
                slots.release()
                await asyncio.gather(*tasks, return_exceptions=True)
                return
            task = asyncio.create_task(one(feed.take()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
