"""The GPU worker pool: one task per GPU, each taking a batch, running it on the backend, handing back outputs.

There is no separate batcher task: a GPU that becomes free asks the tier queue for its
next batch, and the queue makes it wait until that batch is due. A GPU that just
finished therefore starts its next cycle before the responses of the previous batch
are written (their callbacks run after it). Writing ~30 responses first had delayed
every cycle by a few ms and, at full GPU occupancy, pushed measured latency 5-6% above
the simulator's.

Internal-API batches (:meth:`GpuPool.run_now`, e.g. synthetic calibration batches) go
to the next free GPU ahead of the tier queues; they are run, not logged as traffic.

Workers come and go while the server runs (engine replicas that register and leave,
SPEC section 13): :meth:`GpuPool.start_worker` adds one, :meth:`GpuPool.retire` drains
one. A retiring worker takes nothing new, finishes what it runs (every accepted request
is answered) and ends; the queue's zones follow the count of workers left.

With ``routing`` other than ``shared_queue`` (continuous batching), each request is sent to
one worker's own room at arrival (:class:`~..queues.routed_queue.RoutedQueue`), chosen by
:meth:`GpuPool.route` from what each worker runs, queues and caches; a retiring worker's
waiting requests are routed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ...core.model import Routing
from ...core.prompt_blocks import prompt_content_keys
from ...core.routing import choose_replica
from ...core.tiers import Tier
from ..api_errors import ApiError
from ..backends.base import Backend, BackendError, Generate, Generated
from ..metrics import ServerMetrics
from ..queues.memory_queue import MemoryQueue, Pending, WaitingRoom, deliver_to_futures
from ..queues.queue import Queued, TierQueue
from ..queues.routed_queue import RoutedQueue
from .continuous import StepFeed, pass_through
from .prefix_index import SentPrefixes

__all__ = ["SERVED_LOG_SIZE", "GpuPool", "ServedBatch"]

log = logging.getLogger("infer_plan.server.workers.gpu_pool")

SERVED_LOG_SIZE = 50_000  # a few MB; at 100 batches/s the last eight minutes of traffic
CRASH_BACKOFF_S = 0.1  # a step loop that dies at once again (a persistent bug) does not spin the CPU


@dataclass(frozen=True, slots=True)
class ServedBatch:
    """One batch of client traffic that completed: what ``calibrate --from-traffic`` and ``loadtest --batch-log`` fit.

    Batch times under real load (with the gateway, the load and the neighbours on the
    machine) can differ from those of batches run alone, which is why they are kept.
    """

    ended_at: float  # time.time()
    size: int
    ms: float  # how long the batch held its GPU
    phases: dict[str, float] | None = None  # PCIe in / kernel / PCIe out (ms), from a backend that times them


class _DirectBatch(list):
    """An internal-API batch: run as it is, answered here, not traffic."""


class GpuPool:
    """``worker(g)`` is the task of GPU ``g``; the pool counts what runs and logs what was served."""

    def __init__(
        self,
        queue: TierQueue,
        backend: Backend,
        metrics: ServerMetrics,
        *,
        timeout_s: float,
        continuous_seqs: int | None = None,
    ) -> None:
        self.continuous_seqs = continuous_seqs  # set: continuous batching, this many sequences per GPU
        self.feeds: list[StepFeed] = []
        self.queue = queue
        self.backend = backend
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.direct: deque[_DirectBatch] = deque()
        self.served: deque[ServedBatch] = deque(maxlen=SERVED_LOG_SIZE)
        self.running = 0  # batches on a GPU now
        self.running_requests = 0  # requests in those batches
        self.tasks: dict[int, asyncio.Task] = {}  # GPU id -> its worker task; ids are never reused
        self.retiring: set[int] = set()
        self._waiting: set[int] = set()  # workers waiting for a batch (static batching)
        self._ids = itertools.count()
        self.routed = 0  # requests routed so far (round robin's turn)
        if isinstance(queue, RoutedQueue):
            queue.router = self.route
            self.sent = SentPrefixes(queue.model.kv_cache_blocks)
        metrics.gpus.set(queue.gpus)
        metrics.requests_running.set_function(lambda: self.running_requests + sum(f.running for f in self.feeds))

    @property
    def gpus(self) -> int:
        return self.queue.gpus

    def new_gpu_id(self) -> int:
        """An id for a worker about to start (a backend that maps workers to replicas assigns it first)."""
        return next(self._ids)

    def start_worker(self, gpu: int | None = None) -> int:
        """Start a GPU worker (id ``gpu``, or a new one); the zones grow with it. Returns its id."""
        gpu = self.new_gpu_id() if gpu is None else gpu
        self.tasks[gpu] = asyncio.create_task(self._serve(gpu), name=f"gpu-{gpu}")
        self._resize()
        return gpu

    def retire(self, gpu: int) -> asyncio.Future[None]:
        """Drain worker ``gpu``: from now on it takes nothing new (the zones shrink at once); it answers what it
        runs, then ends. The future resolves when it has."""
        task = self.tasks.get(gpu)
        if task is None or gpu in self.retiring:
            return asyncio.ensure_future(asyncio.shield(task) if task is not None else asyncio.sleep(0))
        self.retiring.add(gpu)
        self._resize()
        if isinstance(self.queue, RoutedQueue):
            self.queue.close_room(gpu)  # what waits for it goes elsewhere
        self.queue.wake()
        return asyncio.ensure_future(self._retired(gpu, task))

    async def _retired(self, gpu: int, task: asyncio.Task) -> None:
        try:
            await asyncio.shield(task)
        finally:
            self.retiring.discard(gpu)
            self.tasks.pop(gpu, None)
            self._resize()
            if not self.tasks:
                self.queue.fail_waiting(ApiError(503, "no GPU is serving", code="no_gpus", retry_after_s=5))

    async def stop(self) -> None:
        """Cancel every worker (shutdown, after the drain)."""
        for task in self.tasks.values():
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    def _resize(self) -> None:
        self.queue.resize(len(self.tasks) - len(self.retiring))
        self.metrics.gpus.set(self.queue.gpus)

    async def _serve(self, gpu: int) -> None:
        try:
            await self.worker(gpu)
        except Exception:  # a worker's own fault must not end silently: the pool would shrink unseen
            log.exception("gpu %d: worker failed", gpu)
            raise

    async def run_now(self, requests: list[Generate]) -> list[Generated]:
        """Run ``requests`` as one batch on the next free GPU, bypassing the tier queues."""
        loop = asyncio.get_running_loop()
        batch = _DirectBatch(Pending(r, Tier.ENTERPRISE, loop.time(), loop.create_future()) for r in requests)
        self.direct.append(batch)
        self.queue.wake()
        return list(await asyncio.gather(*(p.future for p in batch)))

    @property
    def is_idle(self) -> bool:
        running = self.running + sum(feed.running for feed in self.feeds)
        return self.queue.queued == 0 and running == 0 and not self.direct

    async def wait_idle(self) -> None:
        """Until nothing of this process is queued or running (the drain on shutdown polls; it is rare)."""
        while not self.is_idle:
            await asyncio.sleep(0.01)

    def _interrupted(self, gpu: int) -> bool:
        """Stop waiting for a batch: an internal batch is due, this worker retires, or a retiring one waits behind
        this one for the queue's assembly lock (it must get the lock to see that it retires)."""
        return bool(self.direct) or gpu in self.retiring or bool(self.retiring & self._waiting)

    async def worker(self, gpu: int) -> None:
        """Serve until retired (:meth:`retire`): batches, or sequences under continuous batching."""
        if self.continuous_seqs is not None:
            return await self._continuous_worker(gpu, self.continuous_seqs)
        metrics = self.metrics
        while gpu not in self.retiring:
            if self.direct:
                batch = self.direct.popleft()
            else:
                self._waiting.add(gpu)
                try:
                    batch = await self.queue.next_batch(lambda: self._interrupted(gpu))
                finally:
                    self._waiting.discard(gpu)
            if not batch:
                continue
            self.running += 1
            self.running_requests += len(batch)
            started = time.perf_counter()
            metrics.gpus_busy.inc()
            try:
                result: list[Generated] | ApiError = await self._run(batch, gpu)
            except ApiError as err:
                result = err
            try:
                if isinstance(batch, _DirectBatch):
                    deliver_to_futures(batch, result)
                else:
                    await self.queue.deliver(batch, result)
            finally:
                elapsed = time.perf_counter() - started
                metrics.gpus_busy.dec()
                metrics.gpu_busy_seconds.inc(elapsed)
                metrics.batch_latency.observe(elapsed)
                metrics.batch_size.observe(len(batch))
                phases = self.backend.batch_phases(gpu) if isinstance(result, list) else None
                for name, ms in (phases or {}).items():
                    metrics.batch_phase.labels(name.removesuffix("_ms")).observe(ms / 1000.0)
                if isinstance(result, list) and not isinstance(batch, _DirectBatch):
                    self.served.append(ServedBatch(time.time(), len(batch), elapsed * 1000.0, phases))
                self.running -= 1
                self.running_requests -= len(batch)

    async def _continuous_worker(self, gpu: int, max_seqs: int) -> None:
        """Sequences join and leave between steps; an internal-API batch runs when the GPU is idle."""
        assert isinstance(self.queue, MemoryQueue)  # ServerConfig refuses continuous batching with --redis
        retiring = self.retiring
        feed = StepFeed(self.queue, gpu, lambda: bool(self.direct) or gpu in retiring, lambda: gpu in retiring)
        self.feeds.append(feed)
        try:
            await self._step_loop(gpu, max_seqs, feed)
        finally:
            self.feeds.remove(feed)
            if isinstance(self.queue, RoutedQueue):
                self.queue.close_room(gpu)
                self.sent.forget(gpu)

    def route(self, request: Generate, rooms: dict[int, WaitingRoom]) -> int:
        """The worker whose room ``request`` waits in (core/routing.py), from what each runs, queues and holds."""
        model, seqs = self.queue.model, self.continuous_seqs or 1
        running = {feed.gpu: feed.running for feed in self.feeds}
        gpus = list(rooms)
        loads = [running.get(g, 0) + len(rooms[g]) for g in gpus]
        free = [load < seqs for load in loads]
        hits, keys = None, None
        if model.routing is Routing.PREFIX_AFFINITY:
            exact = [self.backend.cached_blocks(g, request) for g in gpus]
            if None in exact:  # the engine cannot say: what was sent there
                keys = prompt_content_keys(request.prompt, model.kv_block_tokens)
                exact = [self.sent.hits(g, keys) for g in gpus]
            hits = exact
        self.routed += 1
        chosen = gpus[choose_replica(model.routing, loads, free, hits, self.routed - 1)]
        if keys is not None:
            self.sent.record(chosen, keys)
        return chosen

    async def _step_loop(self, gpu: int, max_seqs: int, feed: StepFeed) -> None:
        while gpu not in self.retiring:
            if self.direct:
                batch = self.direct.popleft()
                try:
                    result: list[Generated] | ApiError = await self._run(batch, gpu)
                except ApiError as err:
                    result = err
                deliver_to_futures(batch, result)
            elif self.backend.steps_itself:
                try:
                    await self.backend.run_continuous(gpu, feed)
                except Exception:  # answered now, not at their deadline; the loop starts again
                    log.exception("gpu %d: the step loop failed", gpu)
                    failed = feed.fail_held(self._fault("exception", _backend_failed()))
                    log.error("gpu %d: %d running requests answered 503; serving again", gpu, failed)
                    await asyncio.sleep(CRASH_BACKOFF_S)
            else:
                await pass_through(lambda batch: self._run(batch, gpu), feed, max_seqs)

    async def _run(self, batch: Sequence[Queued], gpu: int) -> list[Generated]:
        """The backend's outputs for ``batch``; any failure becomes the ApiError every request in it gets."""
        try:
            requests = [p.request for p in batch]
            outputs = await asyncio.wait_for(self.backend.run_batch(requests, gpu), self.timeout_s)
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


class _WrongCountError(Exception):
    pass


def _backend_failed() -> ApiError:
    return ApiError(503, "backend failure", code="backend_error", retry_after_s=1)
