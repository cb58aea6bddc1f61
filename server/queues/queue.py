"""Where admitted requests wait for a GPU: the one interface both tier queues implement.

:class:`~.memory_queue.MemoryQueue` keeps the three tier queues in this process;
:class:`~.shared_queue.SharedQueue` keeps them in Redis so several server processes act
as one service (``serve --redis``). The gateway offers requests to a queue; the GPU
pool (:mod:`.gpu_pool`) asks it for the next batch, runs it and hands the outputs back
for delivery. Both follow the dispatch decision of :mod:`infer_plan.core.dispatch` and
the zones of :mod:`infer_plan.core.admission`, so the choice of queue changes where
requests wait, never which batch forms.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

from ..api_errors import ApiError
from ..backends.base import Generate, Generated

__all__ = ["Interrupted", "Queued", "TierQueue"]

Interrupted = Callable[[], bool]  # asked while a batch assembles: True makes next_batch return None at once


class Queued(Protocol):
    """What a GPU worker needs of a request in its batch: what to generate (delivery is the queue's business)."""

    request: Generate


class TierQueue(ABC):
    """Admission, waiting and delivery of requests; see the module docstring."""

    gpus: int  # GPU workers of this process that take batches from here

    async def start(self) -> None:  # noqa: B027  (nothing to open for a queue in memory)
        """Open what the queue lives in."""

    async def close(self) -> None:  # noqa: B027
        """Release what start() opened; answer whatever still waits."""

    @property
    @abstractmethod
    def queued(self) -> int:
        """Requests of this process still waiting for their answer's batch (the drain waits for them)."""

    @property
    def unavailable(self) -> str | None:
        """Why requests cannot be queued now, or None."""
        return None

    @abstractmethod
    async def depths(self) -> list[int]:
        """Waiting requests per tier, for the metrics page."""

    @abstractmethod
    async def offer(self, request: Generate, tier: int) -> asyncio.Future[Generated] | None:
        """Queue the request if its tier is admitted now; None means shed (429).

        The caller awaits the future, which resolves to the output or raises ApiError.
        """

    @abstractmethod
    async def next_batch(self, interrupted: Interrupted) -> Sequence[Queued] | None:
        """The next batch by the dispatch rule, for a GPU that is free now; None once ``interrupted()``."""

    @abstractmethod
    def resize(self, gpus: int) -> None:
        """This process now has ``gpus`` workers (one started or retired): the zones follow."""

    @abstractmethod
    def wake(self) -> None:
        """Make a waiting ``next_batch`` look again (at ``interrupted`` and at the queue)."""

    @abstractmethod
    async def deliver(self, batch: Sequence[Queued], result: list[Generated] | ApiError) -> None:
        """Hand output *i* (or the batch's error) to the request of position *i*, wherever its client waits."""

    def fail_waiting(self, err: ApiError) -> None:  # noqa: B027  (a shared queue's other instances still serve)
        """No GPU of this process is left to serve: answer what waits for one with ``err`` rather than a timeout."""

    def drain(self) -> None:  # noqa: B027  (a process's own memory queue needs no notice)
        """Shutting down: stop taking work that is not this process's own."""
