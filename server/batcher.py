"""Per-tier queues, the dynamic batcher and the GPU worker pool.

The dispatch rule is the simulator's (SPEC section 2): a batch leaves as soon as a GPU
is free *and* either ``max_batch`` requests are queued or the oldest has waited
``max_wait_ms``; it takes up to ``max_batch`` requests, enterprise first, then paid,
then free, FIFO inside a tier. The batcher assembles the next batch while GPUs run.

Requests carry a future; the GPU worker resolves future *i* with output *i*, so each
answer goes back on the client's still-open connection. Admission (backpressure
zones) happens before a request is queued, so a shed request costs almost nothing.
``shared_queue.SharedBatcher`` is the same class with its queues in Redis (scale-out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..sim.admission import zone_admits
from ..sim.params import ServiceModel, Tier
from .backends.base import Backend, BackendError
from .errors import ApiError
from .metrics import ServerMetrics

__all__ = ["Batcher", "DirectBatch", "Pending", "ServedBatch"]

log = logging.getLogger("infer_plan.server.batcher")

SERVED_LOG_SIZE = 50_000  # a few MB; at 100 batches/s the last eight minutes of traffic


@dataclass(slots=True)
class Pending:
    """One admitted request waiting for its output."""

    text: str
    tier: int
    arrived: float  # loop.time() at arrival
    future: asyncio.Future[str] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServedBatch:
    """One batch of client traffic that completed: what ``calibrate --from-traffic`` and ``loadtest --batch-log`` fit.

    Batch times under real load (with the gateway, the load and the neighbours on the
    machine) can differ from those of batches run alone, which is why they are kept.
    """

    ended_at: float  # time.time()
    size: int
    ms: float  # how long the batch held its GPU


class DirectBatch(list):
    """An internal-API batch (e.g. a synthetic calibration batch): run, but not traffic."""


class Queued(Protocol):
    """What a GPU worker needs of a request in its batch: the input (delivery is the queue's business)."""

    text: str


class Batcher:
    """Owns the queues and the GPUs; ``gpu_worker(g)`` is the task of GPU ``g``.

    There is no separate batcher task: a GPU that becomes free takes the assembly lock
    and waits for the next batch to be due, so the GPU that has been idle longest gets
    the next batch, and a GPU that just finished starts its next cycle before the
    responses of the previous batch are written (their callbacks run after it).
    """

    def __init__(self, model: ServiceModel, backend: Backend, gpus: int, metrics: ServerMetrics) -> None:
        self.model = model
        self.backend = backend
        self.gpus = gpus
        self.metrics = metrics
        self.queues: list[deque[Pending]] = [deque() for _ in Tier]
        self.direct: deque[DirectBatch] = deque()  # internal-API batches, run as they are
        self.served: deque[ServedBatch] = deque(maxlen=SERVED_LOG_SIZE)
        self._queued = 0
        self.max_batch = model.max_batch
        self.max_wait_s = model.max_wait_ms / 1000.0
        self.batch_timeout_s = model.request_timeout_s
        self.thresholds = model.backpressure.thresholds(gpus, model.max_batch)
        self.running = 0
        self._assembly = asyncio.Lock()
        self._wake = asyncio.Event()
        metrics.gpus.set(gpus)

    # -- lifecycle and state the gateway reads ----------------------------------------------

    async def start(self) -> None:
        """Open what the queue lives in (nothing here: it is this process's memory)."""

    async def close(self) -> None:
        """Release what start() opened."""

    @property
    def queued(self) -> int:
        """Requests of this process waiting for a batch (the drain waits for them)."""
        return self._queued

    @property
    def unavailable(self) -> str | None:
        """Why requests cannot be queued now, or None; the in-memory queue is always there."""
        return None

    async def depths(self) -> list[int]:
        """Waiting requests per tier, for the metrics page."""
        return [len(q) for q in self.queues]

    # -- request side ------------------------------------------------------------------

    async def offer(self, text: str, tier: int) -> asyncio.Future[str] | None:
        """Queue the request if its tier is admitted at the current depth; None means shed (429).

        The caller awaits the future, which resolves to the output or raises ApiError.
        """
        if not zone_admits(tier, self._queued, self.thresholds):
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self.queues[tier].append(Pending(text, tier, loop.time(), fut))
        self._queued += 1
        if self._queued == 1 or self._queued >= self.max_batch:
            self._wake.set()  # start the oldest-request clock, or a full batch is ready
        return fut

    async def run_now(self, texts: list[str]) -> list[str]:
        """Run ``texts`` as one batch on the next free GPU, bypassing the tier queues."""
        loop = asyncio.get_running_loop()
        batch = DirectBatch(Pending(text, Tier.ENTERPRISE, loop.time(), loop.create_future()) for text in texts)
        self.direct.append(batch)
        self._wake.set()
        return list(await asyncio.gather(*(p.future for p in batch)))

    @property
    def is_idle(self) -> bool:
        return self.queued == 0 and self.running == 0 and not self.direct

    async def wait_idle(self) -> None:
        """Until nothing of this process is queued or running (the drain on shutdown polls; it is rare)."""
        while not self.is_idle:
            await asyncio.sleep(0.01)

    # -- assembly: the dispatch rule ------------------------------------------------------

    async def _next_batch(self) -> Sequence[Queued]:
        async with self._assembly:
            loop = asyncio.get_running_loop()
            while True:
                if self.direct:
                    return self.direct.popleft()
                self._drop_abandoned_heads()
                if self._queued >= self.max_batch:
                    return self._take()
                if self._queued:
                    remaining = self._oldest() + self.max_wait_s - loop.time()
                    if remaining <= 0:
                        return self._take()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), remaining)
                else:
                    self._wake.clear()
                    await self._wake.wait()

    def _oldest(self) -> float:
        return min(q[0].arrived for q in self.queues if q)

    def _drop_abandoned_heads(self) -> None:
        """Requests whose client gave up (timeout, disconnect) leave the queue without a batch slot."""
        for q in self.queues:
            while q and q[0].future.done():
                q.popleft()
                self._queued -= 1

    def _take(self) -> list[Pending]:
        batch: list[Pending] = []
        for q in self.queues:
            while q and len(batch) < self.max_batch:
                item = q.popleft()
                self._queued -= 1
                if not item.future.done():
                    batch.append(item)
        for tier, q in enumerate(self.queues):
            self.metrics.tier_depth[tier].set(len(q))
        return batch

    # -- GPU workers --------------------------------------------------------------------

    async def gpu_worker(self, gpu: int) -> None:
        metrics = self.metrics
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.running += 1
            started = time.perf_counter()
            metrics.gpus_busy.inc()
            try:
                result: list[str] | ApiError = await self._run(batch, gpu)
            except ApiError as err:
                result = err
            try:
                await self._deliver(batch, result)
            finally:
                elapsed = time.perf_counter() - started
                metrics.gpus_busy.dec()
                metrics.gpu_busy_seconds.inc(elapsed)
                metrics.batch_latency.observe(elapsed)
                metrics.batch_size.observe(len(batch))
                if isinstance(result, list) and not isinstance(batch, DirectBatch):
                    self.served.append(ServedBatch(time.time(), len(batch), elapsed * 1000.0))
                self.running -= 1

    async def _run(self, batch: Sequence[Queued], gpu: int) -> list[str]:
        """The backend's outputs for ``batch``; any failure becomes the ApiError every request in it gets."""
        try:
            outputs = await asyncio.wait_for(self.backend.run_batch([p.text for p in batch], gpu), self.batch_timeout_s)
            if not isinstance(outputs, list) or len(outputs) != len(batch):
                got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
                raise _WrongCountError(f"backend returned {got} outputs for {len(batch)} inputs")
        except TimeoutError:
            raise self._fault("timeout", ApiError(504, "the backend did not answer in time")) from None
        except _WrongCountError as err:
            log.error("gpu %d: %s", gpu, err)
            raise self._fault("wrong_count", _backend_failed()) from None
        except BackendError as err:
            log.error("gpu %d: backend error: %s", gpu, err)
            raise self._fault("error", _backend_failed()) from None
        except Exception:
            log.exception("gpu %d: backend raised", gpu)
            raise self._fault("exception", _backend_failed()) from None
        return outputs

    def _fault(self, kind: str, err: ApiError) -> ApiError:
        self.metrics.backend_faults.labels(kind).inc()
        return err

    async def _deliver(self, batch: Sequence[Queued], result: list[str] | ApiError) -> None:
        """Hand each request its output, or the batch's error: here, the future its handler awaits."""
        if isinstance(result, ApiError):
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(result)
            return
        for item, output in zip(batch, result, strict=True):
            if not item.future.done():
                item.future.set_result(output)


class _WrongCountError(Exception):
    pass


def _backend_failed() -> ApiError:
    return ApiError(503, "backend failure", code="backend_error", retry_after_s=1)
