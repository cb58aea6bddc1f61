"""Per-tier queues, the dynamic batcher and the GPU worker pool.

The dispatch rule is the simulator's (SPEC section 2): a batch leaves as soon as a GPU
is free *and* either ``max_batch`` requests are queued or the oldest has waited
``max_wait_ms``; it takes up to ``max_batch`` requests, enterprise first, then paid,
then free, FIFO inside a tier. The batcher assembles the next batch while GPUs run.

Requests carry a future; the GPU worker resolves future *i* with output *i*, so each
answer goes back on the client's still-open connection. Admission (backpressure
zones) happens before a request is queued, so a shed request costs almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..sim.admission import zone_admits
from ..sim.params import ServiceModel, Tier
from .backends.base import Backend, BackendError
from .errors import ApiError
from .metrics import ServerMetrics

__all__ = ["Batcher", "Pending"]

log = logging.getLogger("infer_plan.server.batcher")


@dataclass(slots=True)
class Pending:
    """One admitted request waiting for its output."""

    text: str
    tier: int
    arrived: float  # loop.time() at arrival
    future: asyncio.Future[str] = field(repr=False)


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
        self.direct: deque[list[Pending]] = deque()  # internal-API batches, run as they are
        self.queued = 0
        self.max_batch = model.max_batch
        self.max_wait_s = model.max_wait_ms / 1000.0
        self.batch_timeout_s = model.request_timeout_s
        self.thresholds = model.backpressure.thresholds(gpus, model.max_batch)
        self.running = 0
        self._assembly = asyncio.Lock()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.gpus.set(gpus)

    # -- request side ------------------------------------------------------------------

    def admits(self, tier: int) -> bool:
        return zone_admits(tier, self.queued, self.thresholds)

    def submit(self, text: str, tier: int) -> asyncio.Future[str]:
        """Queue an admitted request; the caller awaits the future."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self.queues[tier].append(Pending(text, tier, loop.time(), fut))
        self.queued += 1
        self._idle.clear()
        if self.queued == 1 or self.queued >= self.max_batch:
            self._wake.set()  # start the oldest-request clock, or a full batch is ready
        return fut

    async def run_now(self, texts: list[str]) -> list[str]:
        """Run ``texts`` as one batch on the next free GPU, bypassing the tier queues."""
        loop = asyncio.get_running_loop()
        batch = [Pending(text, Tier.ENTERPRISE, loop.time(), loop.create_future()) for text in texts]
        self.direct.append(batch)
        self._idle.clear()
        self._wake.set()
        return list(await asyncio.gather(*(p.future for p in batch)))

    @property
    def is_idle(self) -> bool:
        return self.queued == 0 and self.running == 0 and not self.direct

    async def wait_idle(self) -> None:
        """Until nothing is queued or running (used by the drain on shutdown)."""
        while not self.is_idle:
            self._idle.clear()
            await self._idle.wait()

    # -- assembly: the dispatch rule ------------------------------------------------------

    async def _next_batch(self) -> list[Pending]:
        async with self._assembly:
            loop = asyncio.get_running_loop()
            while True:
                if self.direct:
                    return self.direct.popleft()
                self._drop_abandoned_heads()
                if self.queued >= self.max_batch:
                    return self._take()
                if self.queued:
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
                self.queued -= 1

    def _take(self) -> list[Pending]:
        batch: list[Pending] = []
        for q in self.queues:
            while q and len(batch) < self.max_batch:
                item = q.popleft()
                self.queued -= 1
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
                outputs = await asyncio.wait_for(
                    self.backend.run_batch([p.text for p in batch], gpu), self.batch_timeout_s
                )
                if not isinstance(outputs, list) or len(outputs) != len(batch):
                    got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
                    raise _WrongCountError(f"backend returned {got} outputs for {len(batch)} inputs")
            except TimeoutError:
                self._fail(batch, "timeout", ApiError(504, "the backend did not answer in time"))
            except _WrongCountError as err:
                log.error("gpu %d: %s", gpu, err)
                self._fail(batch, "wrong_count", _backend_failed())
            except BackendError as err:
                log.error("gpu %d: backend error: %s", gpu, err)
                self._fail(batch, "error", _backend_failed())
            except Exception:
                log.exception("gpu %d: backend raised", gpu)
                self._fail(batch, "exception", _backend_failed())
            else:
                for item, output in zip(batch, outputs, strict=True):
                    if not item.future.done():
                        item.future.set_result(output)
            finally:
                elapsed = time.perf_counter() - started
                metrics.gpus_busy.dec()
                metrics.gpu_busy_seconds.inc(elapsed)
                metrics.batch_latency.observe(elapsed)
                metrics.batch_size.observe(len(batch))
                self.running -= 1
                if self.is_idle:
                    self._idle.set()

    def _fail(self, batch: list[Pending], kind: str, err: ApiError) -> None:
        self.metrics.backend_faults.labels(kind).inc()
        for item in batch:
            if not item.future.done():
                item.future.set_exception(err)


class _WrongCountError(Exception):
    pass


def _backend_failed() -> ApiError:
    return ApiError(503, "backend failure", code="backend_error", retry_after_s=1)
