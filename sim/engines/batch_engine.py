"""The batch cycle of the design (``batching = "static"``), simulated batch by batch.

SimPy drives time at batch granularity: the dispatcher process sleeps until the next
moment the dispatch decision (:func:`infer_plan.core.dispatch.decide`, the one the
server's queues follow too) can say "take": the queue reaches ``max_batch``, the oldest
request reaches ``max_wait_ms``, a GPU frees up. It then takes the batch by tier
priority (:class:`~.waiting.WaitingQueues`) and books its GPU cycle
(``ServiceModel.batch_hold_ms``). Requests never get a SimPy process of their own:
arrival times, tiers, admission and completion times live in numpy arrays. That is
what makes an hour at 10,000 req/s take seconds (``benchmarks/bench_sim.py``);
:mod:`infer_plan.sim.references.reference` is the slow per-request model the tests hold it to.

With token lengths the batch also runs its steps (SPEC section 10): PCIe in, kernel,
then one prefill step for all prompts, then decode steps until the longest sequence is
done, then PCIe out. Every request's first and last token follow from the batch's
lengths in closed form (no loop over steps), and the gaps between tokens are kept as
(gap, count per tier) pairs; :mod:`.static_tokens` computes them for many batches at once.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import numpy as np
import simpy

from ...core.dispatch import EPS, Take, decide
from ...core.model import ServiceModel
from ...core.records import RequestRecords
from ..inputs.arrivals import Arrivals
from ..results.sinks import Sink, simulated_outcomes
from .fleet import Fleet, GpuState
from .static_tokens import StaticTokenBook
from .waiting import WaitingQueues

__all__ = ["BatchEngine"]


class BatchEngine:
    def __init__(
        self,
        env: simpy.Environment,
        model: ServiceModel,
        chunks: Iterable[Arrivals],
        gpus: int,
        rng: np.random.Generator,
        *,
        horizon_s: float,
        sample_every_s: float,
        tokens: bool,
        stream: bool,
        load_factor,
        sink: Sink,
    ) -> None:
        self.env = env
        self.model = model
        self.horizon_s = horizon_s
        columns: dict[str, tuple[type, object]] = {"completion": (np.float64, np.nan), "failed": (np.bool_, False)}
        if tokens:
            columns["first_token"] = (np.float64, np.nan)
        self.waiting = WaitingQueues(chunks, columns)
        self.cols = self.waiting.cols  # completion, failed, first_token: one row per loaded request
        self.waiting.fold, self.waiting.on_rebase, self.waiting.pinned = self._fold, self._shift, self._pinned
        self.sink = sink
        self.rule = model.dispatch_rule
        # The cycle formula tabulated once per batch size: looked up per batch, it costs nothing.
        self.hold_ms = [model.batch_hold_ms(size) for size in range(model.max_batch + 1)]
        self.hold_s = [hold / 1000.0 for hold in self.hold_ms]
        self.max_batch = model.max_batch
        self.max_wait_s = model.max_wait_ms / 1000.0
        self.shared_queue_s = model.shared_queue_ms / 1000.0  # answers reach the client this much after the batch
        # Measured batch-time variability (calibrate): its own stream, so faults draw as before.
        self.jitter_rng = np.random.default_rng(rng.integers(2**63)) if model.cycle_jitter else None
        self.jitter_u = np.linspace(0.0, 1.0, len(model.cycle_jitter))  # quantile grid, built once, not per batch
        self.jitter_q = np.asarray(model.cycle_jitter, dtype=float)

        self.tokens = tokens
        self.token_book = StaticTokenBook(model, stream=stream, shared_queue_s=self.shared_queue_s)

        # free_at is inf for any GPU that cannot take a batch (down, cold, retired, in a window).
        # A heap of (free_at, gpu) finds the next free GPU in O(log G) among thousands; an entry
        # whose time no longer matches free_at is stale and skipped when it comes to the top.
        self.free_at: list[float] = [0.0] * gpus
        self.free_heap: list[tuple[float, int]] = [(0.0, g) for g in range(gpus)]
        self.running: list[np.ndarray | None] = [None] * gpus  # ids on each GPU, kept only with faults
        self.windows: list[tuple[float, int]] = []  # open assembly windows without overlap: (end, gpu)
        self.track_running = model.faults.mtbf_s is not None

        self.b_start: list[float] = []
        self.b_end: list[float] = []
        self.b_size: list[int] = []
        self.dispatcher: simpy.Process | None = None
        self.fleet = Fleet(
            env,
            model,
            gpus,
            rng,
            self,
            load_factor=load_factor,
            capacity=model.max_batch,
            horizon_s=horizon_s,
            sample_every_s=sample_every_s,
        )

    def _set_free(self, gpu: int, at: float) -> None:
        self.free_at[gpu] = at
        if at < math.inf:
            heapq.heappush(self.free_heap, (at, gpu))

    def take_batch(self, now: float, gpu: int, taken_at: float, n: int) -> None:
        """Take ``n`` queued requests by priority and run them on ``gpu``."""
        parts = self.waiting.take(n)
        if n == 0:
            self._set_free(gpu, now)
            return
        jitter = float(np.interp(self.jitter_rng.random(), self.jitter_u, self.jitter_q)) if self.jitter_rng else 1.0
        if not self.tokens:
            done = now + self.hold_s[n] * jitter
            completion = self.cols.completion
            for ids in parts:
                completion[ids] = done + self.shared_queue_s
        else:
            done = self._run_steps(parts[0] if len(parts) == 1 else np.concatenate(parts), now, jitter)
        if self.track_running:
            self.running[gpu] = np.concatenate(parts)
        self._set_free(gpu, done)
        self.b_start.append(taken_at)
        self.b_end.append(done)
        self.b_size.append(n)

    def _run_steps(self, ids: np.ndarray, start: float, jitter: float) -> float:
        """Book the batch's tokens (settled later, many batches at once); return its end, which frees the GPU."""
        model, waiting = self.model, self.waiting
        assert waiting.prompt_tokens is not None and waiting.output_tokens is not None
        output = waiting.output_tokens[ids]
        n, prompt_total = ids.size, int(np.add.reduce(waiting.prompt_tokens[ids]))
        output_total, longest = int(np.add.reduce(output)), int(np.maximum.reduce(output))
        scale = jitter / 1000.0
        # model.static_batch_ms, inlined term by term (same sums in the same order): this runs once a batch.
        step = model.decode_step_ms + model.prefill_ms_per_token * prompt_total + model.decode_ms_per_seq * n
        decode = (longest - 1) * model.decode_step_ms + model.decode_ms_per_seq * (output_total - n)
        end = start + (self.hold_ms[n] + step + decode) * scale
        self.token_book.book(ids, start, scale, prompt_total, output_total, longest, end)
        return end

    def _settle_tokens(self) -> None:
        waiting = self.waiting
        if self.tokens and waiting.output_tokens is not None:
            self.token_book.settle(waiting.output_tokens, waiting.tiers, self.cols)

    # -- handing settled requests over --------------------------------------------------------

    def _fold(self, cut: int) -> None:
        """Hand rows [0, cut) (all answered, shed or failed) and the batches booked so far to the sink."""
        waiting = self.waiting
        self.sink.fold_batches(*self.batches())
        self.b_start, self.b_end, self.b_size = [], [], []
        if self.tokens:
            self._settle_tokens()
            self.sink.fold_gaps(self.token_book.take_gaps())
        self.sink.fold(self._records(cut))
        folded_until = min(self.env.now, float(waiting.times[cut]) if cut < waiting.n else math.inf)
        if self.sink.settled(folded_until):
            waiting.stop = True

    def _records(self, cut: int, *, final: bool = False) -> RequestRecords:
        waiting, cols = self.waiting, self.cols
        outcome = simulated_outcomes(waiting.admitted[:cut], cols.failed[:cut], cols.completion[:cut], final=final)
        lengths = waiting.prompt_tokens, waiting.output_tokens
        return RequestRecords(
            tier=waiting.tiers[:cut],
            scheduled=waiting.times[:cut],
            finished=cols.completion[:cut],
            outcome=outcome,
            first_token=cols.first_token[:cut] if self.tokens else None,
            prompt_tokens=lengths[0][:cut] if lengths[0] is not None else None,
            output_tokens=lengths[1][:cut] if lengths[1] is not None else None,
        )

    def finish(self) -> None:
        """The run is over: hand every row left over."""
        self.sink.fold_batches(*self.batches())
        if self.tokens:
            self._settle_tokens()
            self.sink.fold_gaps(self.token_book.take_gaps())
        self.sink.fold(self._records(self.waiting.n, final=True))

    def _shift(self, cut: int) -> None:
        for gpu, ids in enumerate(self.running):
            if ids is not None:
                self.running[gpu] = ids - cut

    def _pinned(self) -> int:
        """The lowest row a running batch holds: a GPU failure may still fail it."""
        held = [int(ids.min()) for ids in self.running if ids is not None and ids.size]
        return min(held, default=self.waiting.n)

    def batches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.b_start), np.asarray(self.b_end), np.asarray(self.b_size, dtype=np.int64)

    def next_gpu_free(self) -> float:
        heap, free_at = self.free_heap, self.free_at
        while heap and free_at[heap[0][1]] != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def free_gpu(self, now: float) -> int:
        """The GPU free soonest (lowest number among equals), if it is free by ``now``; else -1."""
        return self.free_heap[0][1] if self.next_gpu_free() <= now + EPS else -1

    # -- the dispatcher: the SPEC's rule, with and without overlap -----------------------

    def step_overlap(self, now: float) -> float:
        """Dispatch every batch due now; return when the decision could say "take" next."""
        waiting = self.waiting
        while True:
            gpu = self.free_gpu(now)
            queued = waiting.queued
            oldest = waiting.oldest_arrival() if queued and gpu >= 0 else math.inf  # decide() reads it only then
            decision = decide(self.rule, queued, oldest, now, gpu >= 0)
            if type(decision) is Take:
                self.take_batch(now, gpu, now, decision.n)
                continue
            # Look ahead: the engine knows the arrivals to come, so it sleeps past every
            # moment at which the decision would still say "wait".
            if gpu < 0:
                return self.next_gpu_free() if queued else max(self.next_gpu_free(), waiting.next_arrival_time())
            deadline = decision.until
            if not queued:  # the next arrival will start the clock
                deadline = waiting.next_arrival_time() + self.max_wait_s
            return min(deadline, waiting.time_queue_reaches(self.max_batch - queued, deadline))

    def step_no_overlap(self, now: float) -> float:
        """Without overlap a free GPU holds an assembly window of max_wait_ms, then runs."""
        waiting = self.waiting
        due = [w for w in self.windows if w[0] <= now + EPS]
        if due:
            self.windows = [w for w in self.windows if w[0] > now + EPS]
            for _, gpu in sorted(due):
                if self.fleet.state[gpu] is GpuState.UP:
                    self.take_batch(now, gpu, now - self.max_wait_s, min(waiting.queued, self.max_batch))
        # Open a window on each free GPU while queued requests exceed what open windows will take.
        while waiting.queued > self.max_batch * len(self.windows):
            gpu = self.free_gpu(now)
            if gpu < 0:
                break
            self.free_at[gpu] = math.inf  # held by the window (its heap entry goes stale)
            self.windows.append((now + self.max_wait_s, gpu))
        wake = min((w[0] for w in self.windows), default=math.inf)
        uncovered = waiting.queued - self.max_batch * len(self.windows)
        if uncovered > 0:
            return min(wake, self.next_gpu_free())
        # Next wake-up: a window closes, or enough arrivals for one more window.
        return min(wake, waiting.time_queue_reaches(1 - uncovered, wake))

    def run(self):  # SimPy process: the dispatcher
        env, waiting = self.env, self.waiting
        step = self.step_overlap if self.model.overlap else self.step_no_overlap
        while True:
            now = env.now
            waiting.admit_until(now)
            wake = step(now)
            if wake == math.inf:
                if waiting.drained and not self.windows:
                    return
                # Work is queued but no GPU serves: wait for the fleet to change (poke).
                wake = now + self.horizon_s + 3600.0
            try:  # noqa: SIM105  (contextlib.suppress would build an object per batch on this hot loop)
                yield env.timeout(wake - now if wake > now else 0.0)
            except simpy.Interrupt:  # a poke: the fleet changed, re-plan now
                pass

    def poke(self) -> None:
        """Make the dispatcher re-plan now (the fleet changed)."""
        proc = self.dispatcher
        if proc is not None and proc.is_alive and proc.target is not None and proc is not self.env.active_process:
            proc.interrupt()

    # -- what the fleet tells us ------------------------------------------------------------------

    def gpu_added(self) -> None:
        self.free_at.append(math.inf)
        self.running.append(None)

    def gpu_changed(self, gpu: int, state: GpuState) -> None:
        self._set_free(gpu, self.env.now if state is GpuState.UP else math.inf)
        if state is not GpuState.UP:
            self.windows = [w for w in self.windows if w[1] != gpu]
        self.poke()

    def gpu_failing(self, gpu: int) -> None:
        now = self.env.now
        if self.free_at[gpu] > now and self.running[gpu] is not None:
            self._settle_tokens()  # its booked token times first, so the failure's time is the last word
            ids = self.running[gpu]
            self.cols.failed[ids] = True
            self.cols.completion[ids] = now  # the clients get their error now

    def retire_choice(self, up: list[int]) -> int:
        return min(up, key=lambda g: self.free_at[g])
