"""The batch-level discrete-event simulator.

SimPy drives time at batch granularity: the dispatcher process sleeps until the next
moment the dispatch decision (:func:`infer_plan.core.dispatch.decide`, the one the
server's queues follow too) can say "take": the queue reaches ``max_batch``, the oldest
request reaches ``max_wait_ms``, a GPU frees up. It then takes the batch by tier
priority and books its GPU cycle (``ServiceModel.batch_hold_ms``). Requests never get
a SimPy process of their own: arrival times, tiers, admission and completion times
live in numpy arrays, and each tier's FIFO queue is a slice of a preallocated index
buffer. That is what makes an hour at 10,000 req/s take
seconds (see ``benchmarks/bench_sim.py``); :mod:`infer_plan.sim.reference` holds the
slow per-request model the tests compare this one against.

Side processes (GPU failures and repairs, the autoscaler, the time-series monitor)
change the fleet and interrupt the dispatcher so it re-plans at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import simpy

from ..core.admission import admit_burst
from ..core.dispatch import EPS as _EPS
from ..core.dispatch import Take, decide, take_by_priority
from ..core.model import ServiceModel
from ..core.records import Outcome, RequestRecords
from ..core.schema import ScaleAction, ScaleEvent
from ..core.tiers import Tier
from .arrivals import Arrivals

__all__ = ["EngineOutput", "GpuState", "simulate_arrivals"]

_N_TIERS = len(Tier)


class GpuState(IntEnum):
    UP = 0
    DOWN = 1  # failed, waiting for repair
    COLD = 2  # provisioned, cold-starting
    RETIRED = 3  # scaled down


@dataclass
class EngineOutput:
    """Raw per-request and per-batch records of one run; summarised by :mod:`.metrics`.

    ``records.finished`` is when each answer reaches its client; a request whose batch
    was on a GPU that failed is FAILED and finished when the failure answered it.
    """

    records: RequestRecords
    batch_start: np.ndarray  # when the GPU was taken (window open without overlap)
    batch_end: np.ndarray
    batch_size: np.ndarray
    up_changes: np.ndarray  # (time, GPUs up) after each change, first row at t=0
    timeseries: dict[str, np.ndarray] = field(default_factory=dict)
    scale_events: list[ScaleEvent] = field(default_factory=list)
    longest_above_s: float = 0.0


class _Engine:
    def __init__(
        self,
        env: simpy.Environment,
        model: ServiceModel,
        arrivals: Arrivals,
        gpus: int,
        rng: np.random.Generator,
        horizon_s: float,
        sample_every_s: float,
    ) -> None:
        self.env = env
        self.model = model
        self.rng = rng
        self.horizon_s = horizon_s
        self.sample_every_s = sample_every_s
        self.times = arrivals.times
        self.tiers = arrivals.tiers
        self.n = arrivals.times.size
        self.rule = model.dispatch_rule
        # The cycle formula tabulated once per batch size: looked up per batch, it costs nothing.
        self.hold_s = [model.batch_hold_ms(size) / 1000.0 for size in range(model.max_batch + 1)]
        self.max_batch = model.max_batch
        self.max_wait_s = model.max_wait_ms / 1000.0
        self.shared_queue_s = model.shared_queue_ms / 1000.0  # answers reach the client this much after the batch
        # Measured batch-time variability (calibrate): its own stream, so faults draw as before.
        self.jitter_rng = np.random.default_rng(rng.integers(2**63)) if model.cycle_jitter else None
        self.jitter_u = np.linspace(0.0, 1.0, len(model.cycle_jitter))  # quantile grid, built once, not per batch
        self.jitter_q = np.asarray(model.cycle_jitter, dtype=float)

        self.admitted = np.ones(self.n, dtype=bool)
        self.completion = np.full(self.n, np.nan)
        self.failed = np.zeros(self.n, dtype=bool)

        # Per-tier FIFO queues: admitted request ids in arrival order; head/tail pointers.
        self.tier_ids = [np.flatnonzero(self.tiers == k) for k in range(_N_TIERS)]
        self.tier_pos = [0] * _N_TIERS  # how many of tier_ids[k] have been processed
        self.queue = [np.empty(ids.size, dtype=np.int64) for ids in self.tier_ids]
        self.head = [0] * _N_TIERS
        self.tail = [0] * _N_TIERS
        self.queued = 0
        self.next_arrival = 0

        # free_at is inf for any GPU that cannot take a batch (down, cold, retired, in a window),
        # so "a free GPU" and "the next GPU to free up" are both a builtin min() away.
        self.free_at: list[float] = [0.0] * gpus
        self.state: list[GpuState] = [GpuState.UP] * gpus
        self.n_up = gpus
        self._thresholds = model.backpressure.thresholds(gpus, model.max_batch)
        self.running: list[np.ndarray | None] = [None] * gpus  # ids on each GPU, kept only with faults
        self.windows: list[tuple[float, int]] = []  # open assembly windows without overlap: (end, gpu)
        self.track_running = model.faults.mtbf_s is not None

        self.b_start: list[float] = []
        self.b_end: list[float] = []
        self.b_size: list[int] = []
        self.up_changes: list[tuple[float, int]] = [(0.0, gpus)]
        self.scale_events: list[ScaleEvent] = []  # the autoscaler's decisions, for the report
        self.longest_above_s = 0.0  # the longest the autoscaler saw its load above the scale-up trigger
        self.dispatcher: simpy.Process | None = None

    # -- queue bookkeeping ---------------------------------------------------------------

    def set_state(self, gpu: int, state: GpuState) -> None:
        self.state[gpu] = state
        self.free_at[gpu] = self.env.now if state is GpuState.UP else math.inf
        self.n_up = sum(1 for s in self.state if s is GpuState.UP)
        self._thresholds = self.model.backpressure.thresholds(self.n_up, self.max_batch)
        self.up_changes.append((self.env.now, self.n_up))
        self.poke()

    def admit_until(self, now: float) -> None:
        """Admit (or shed) every arrival up to ``now``; depth only grows until the next dispatch."""
        start = self.next_arrival
        stop = int(self.times.searchsorted(now + _EPS, side="right"))
        if stop <= start:
            return
        self.next_arrival = stop
        depth = self.queued
        thresholds = self._thresholds
        all_in = depth + (stop - start) <= thresholds[0]
        mask = None if all_in else admit_burst(self.tiers[start:stop], depth, thresholds)[0]
        if mask is not None:
            self.admitted[start:stop] = mask
        tier_pos, tail, queued = self.tier_pos, self.tail, 0
        for k, ids in enumerate(self.tier_ids):
            lo = tier_pos[k]
            hi = int(ids.searchsorted(stop))
            if hi == lo:
                continue
            tier_pos[k] = hi
            chunk = ids[lo:hi] if mask is None else ids[lo:hi][mask[ids[lo:hi] - start]]
            t = tail[k]
            self.queue[k][t : t + chunk.size] = chunk
            tail[k] = t + chunk.size
            queued += chunk.size
        self.queued += queued

    def records(self) -> RequestRecords:
        """The run's per-request records: each REJECTED, FAILED, OK, or PENDING if no GPU ever served it."""
        outcome = np.where(self.admitted, np.int8(Outcome.OK), np.int8(Outcome.REJECTED))
        if self.track_running:  # only a GPU failure fails a request
            outcome[self.failed] = Outcome.FAILED
        if self.queued:  # the run ended with requests no GPU took (the whole fleet down)
            outcome[self.admitted & np.isnan(self.completion)] = Outcome.PENDING
        return RequestRecords(tier=self.tiers, scheduled=self.times, finished=self.completion, outcome=outcome)

    def next_arrival_time(self) -> float:
        return float(self.times[self.next_arrival]) if self.next_arrival < self.n else math.inf

    def oldest_arrival(self) -> float:
        oldest = math.inf
        for k in range(_N_TIERS):
            if self.tail[k] > self.head[k]:
                oldest = min(oldest, self.times[self.queue[k][self.head[k]]])
        return oldest

    def time_queue_reaches(self, need: int, until: float) -> float:
        """When ``need`` more requests will have been admitted, if before ``until``; else inf."""
        start = self.next_arrival
        stop = int(self.times.searchsorted(until + _EPS, side="right"))
        if stop - start < need:
            return math.inf
        depth = self.queued
        thresholds = self._thresholds
        if depth + need <= thresholds[0]:
            return float(self.times[start + need - 1])
        mask, _ = admit_burst(self.tiers[start:stop], depth, thresholds)
        counts = np.cumsum(mask)
        if counts[-1] < need:
            return math.inf
        return float(self.times[start + int(np.searchsorted(counts, need))])

    def take_batch(self, now: float, gpu: int, taken_at: float, n: int) -> None:
        """Take ``n`` queued requests by priority and run them on ``gpu``."""
        parts: list[np.ndarray] = []
        head, tail = self.head, self.tail
        for k, m in enumerate(take_by_priority((tail[0] - head[0], tail[1] - head[1], tail[2] - head[2]), n)):
            if m:
                h = head[k]
                parts.append(self.queue[k][h : h + m])
                head[k] = h + m
        size = n
        self.queued -= size
        if size == 0:
            self.free_at[gpu] = now
            return
        hold = self.hold_s[size]
        if self.jitter_rng is not None:
            hold *= float(np.interp(self.jitter_rng.random(), self.jitter_u, self.jitter_q))
        done = now + hold
        for ids in parts:
            self.completion[ids] = done + self.shared_queue_s
        if self.track_running:
            self.running[gpu] = np.concatenate(parts)
        self.free_at[gpu] = done
        self.b_start.append(taken_at)
        self.b_end.append(done)
        self.b_size.append(size)

    def free_gpu(self, now: float) -> int:
        soonest = min(self.free_at, default=math.inf)
        return self.free_at.index(soonest) if soonest <= now + _EPS else -1

    def next_gpu_free(self) -> float:
        return min(self.free_at, default=math.inf)

    # -- the dispatcher: the SPEC's rule, with and without overlap -----------------------

    def step_overlap(self, now: float) -> float:
        """Dispatch every batch due now; return when the decision could say "take" next."""
        while True:
            gpu = self.free_gpu(now)
            queued = self.queued
            oldest = self.oldest_arrival() if queued and gpu >= 0 else math.inf  # decide() reads it only then
            decision = decide(self.rule, queued, oldest, now, gpu >= 0)
            if type(decision) is Take:
                self.take_batch(now, gpu, now, decision.n)
                continue
            # Look ahead: the engine knows the arrivals to come, so it sleeps past every
            # moment at which the decision would still say "wait".
            if gpu < 0:
                return self.next_gpu_free() if queued else max(self.next_gpu_free(), self.next_arrival_time())
            deadline = decision.until
            if not queued:  # the next arrival will start the clock
                deadline = self.next_arrival_time() + self.max_wait_s
            return min(deadline, self.time_queue_reaches(self.max_batch - queued, deadline))

    def step_no_overlap(self, now: float) -> float:
        """Without overlap a free GPU holds an assembly window of max_wait_ms, then runs."""
        due = [w for w in self.windows if w[0] <= now + _EPS]
        if due:
            self.windows = [w for w in self.windows if w[0] > now + _EPS]
            for _, gpu in sorted(due):
                if self.state[gpu] is GpuState.UP:
                    self.take_batch(now, gpu, now - self.max_wait_s, min(self.queued, self.max_batch))
        # Open a window on each free GPU while queued requests exceed what open windows will take.
        while self.queued > self.max_batch * len(self.windows):
            gpu = self.free_gpu(now)
            if gpu < 0:
                break
            self.free_at[gpu] = math.inf  # held by the window
            self.windows.append((now + self.max_wait_s, gpu))
        wake = min((w[0] for w in self.windows), default=math.inf)
        uncovered = self.queued - self.max_batch * len(self.windows)
        if uncovered > 0:
            return min(wake, self.next_gpu_free())
        # Next wake-up: a window closes, or enough arrivals for one more window.
        horizon = wake if wake < math.inf else (self.times[-1] if self.n else 0.0)
        return min(wake, self.time_queue_reaches(1 - uncovered, horizon))

    def run_dispatcher(self):  # SimPy process
        env = self.env
        step = self.step_overlap if self.model.overlap else self.step_no_overlap
        while True:
            now = env.now
            self.admit_until(now)
            wake = step(now)
            if wake == math.inf:
                if self.next_arrival >= self.n and self.queued == 0 and not self.windows:
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

    # -- side processes ------------------------------------------------------------------

    def gpu_faults(self, gpu: int):  # SimPy process
        faults = self.model.faults
        assert faults.mtbf_s is not None
        env = self.env
        while True:
            yield env.timeout(self.rng.exponential(faults.mtbf_s))
            if self.state[gpu] is not GpuState.UP:
                continue
            now = env.now
            if self.free_at[gpu] > now and self.running[gpu] is not None:
                ids = self.running[gpu]
                self.failed[ids] = True
                self.completion[ids] = now  # the clients get their error now
            self.windows = [w for w in self.windows if w[1] != gpu]
            self.set_state(gpu, GpuState.DOWN)
            yield env.timeout(self.rng.exponential(faults.mttr_s))
            self.set_state(gpu, GpuState.UP)

    def provision(self):  # SimPy process
        gpu = len(self.state)
        self.state.append(GpuState.COLD)
        self.free_at.append(math.inf)
        self.running.append(None)
        self.log_scaling(ScaleAction.ORDERED)
        yield self.env.timeout(self.model.cold_start_s)
        self.set_state(gpu, GpuState.UP)
        self.log_scaling(ScaleAction.SERVING)
        if self.model.faults.mtbf_s is not None:
            self.env.process(self.gpu_faults(gpu))

    def autoscaler(self):  # SimPy process
        policy = self.model.autoscale
        env = self.env
        load_factor = self.model.load_factor
        above_since: float | None = None
        below_since: float | None = None
        while True:
            yield env.timeout(policy.tick_s)
            now = env.now
            lo, hi = np.searchsorted(self.times, [now - policy.tick_s, now])
            rate = (hi - lo) / policy.tick_s
            fleet = sum(1 for s in self.state if s in (GpuState.UP, GpuState.COLD))
            if load_factor(rate, max(fleet, 1)) > policy.scale_up_load and fleet < policy.max_gpus:
                above_since = now if above_since is None else above_since
                self.longest_above_s = max(self.longest_above_s, now - above_since)
                if now - above_since >= policy.scale_up_after_s - _EPS:
                    env.process(self.provision())
                    above_since = None
            else:
                above_since = None
            fewer = fleet - 1
            if fewer >= policy.min_gpus and load_factor(rate, fewer) < policy.scale_down_load:
                below_since = now if below_since is None else below_since
                if now - below_since >= policy.scale_down_after_s - _EPS:
                    self.retire_one()
                    below_since = None
            else:
                below_since = None

    def retire_one(self) -> None:
        """Release one serving GPU, an idle one if any; a batch it is running still completes."""
        up = [g for g, s in enumerate(self.state) if s is GpuState.UP]
        if up:
            gpu = min(up, key=lambda g: self.free_at[g])
            self.windows = [w for w in self.windows if w[1] != gpu]
            self.set_state(gpu, GpuState.RETIRED)
            self.log_scaling(ScaleAction.RELEASED)

    def log_scaling(self, action: ScaleAction) -> None:
        cold = sum(1 for s in self.state if s is GpuState.COLD)
        self.scale_events.append(ScaleEvent(t_s=self.env.now, action=action, gpus_up=self.n_up, gpus_cold=cold))

    def monitor(self, samples: dict[str, list[float]]):  # SimPy process
        env = self.env
        step = self.sample_every_s
        while env.now <= self.horizon_s:
            now = env.now
            self.admit_until(now)
            lo, hi = np.searchsorted(self.times, [now - step, now])
            up = self.n_up
            samples["t_s"].append(now)
            samples["queue_depth"].append(self.queued)
            samples["gpus_up"].append(up)
            samples["gpus_provisioning"].append(sum(1 for s in self.state if s is GpuState.COLD))
            rate = (hi - lo) / step if now > 0 else 0.0
            samples["offered_rps"].append(rate)
            samples["load_factor"].append(self.model.load_factor(rate, up) if up else 0.0)
            yield env.timeout(step)


def simulate_arrivals(
    model: ServiceModel,
    arrivals: Arrivals,
    gpus: int,
    *,
    seed: int = 0,
    horizon_s: float | None = None,
    sample_every_s: float | None = None,
) -> EngineOutput:
    """Run the service model over a fixed set of arrivals on ``gpus`` GPUs."""
    if gpus < 1:
        raise ValueError('"gpus" must be >= 1.')
    horizon = horizon_s if horizon_s is not None else max(arrivals.end_s, 1e-3)
    every = sample_every_s if sample_every_s is not None else max(1.0, horizon / 600.0)
    env = simpy.Environment()
    engine = _Engine(env, model, arrivals, gpus, np.random.default_rng(seed + 1_000_003), horizon, every)
    samples: dict[str, list[float]] = {
        k: [] for k in ("t_s", "queue_depth", "gpus_up", "gpus_provisioning", "offered_rps", "load_factor")
    }
    engine.dispatcher = env.process(engine.run_dispatcher())
    env.process(engine.monitor(samples))
    if model.faults.mtbf_s is not None:
        for gpu in range(gpus):
            env.process(engine.gpu_faults(gpu))
    if model.autoscale.enabled:
        env.process(engine.autoscaler())
    env.run(until=engine.dispatcher)
    return EngineOutput(
        records=engine.records(),
        batch_start=np.asarray(engine.b_start),
        batch_end=np.asarray(engine.b_end),
        batch_size=np.asarray(engine.b_size, dtype=np.int64),
        up_changes=np.asarray(engine.up_changes, dtype=np.float64),
        timeseries={k: np.asarray(v) for k, v in samples.items()},
        scale_events=engine.scale_events,
        longest_above_s=engine.longest_above_s,
    )
