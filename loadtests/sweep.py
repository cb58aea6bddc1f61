"""``loadtest --sweep``: the highest offered rate at which a real target holds every SLO set (its knee).

The search, bounded in time and requests throughout:

1. *Saturation probe* (unless ``rates`` are given): a burst of requests sent at once;
   answers per second while they drain is the target's throughput, ``S``. No rate above
   ``S`` can be held for long, so it brackets the knee from above without sending an
   open-loop flood at a target of unknown size.
2. *Bracket*: the lowest rate (``--rps``, else ``S / 2``) must hold; if it fails it is
   halved, at most four times, before the sweep says no rate holds. Then ``1.1 S`` (capped
   by ``--max-rps``) must fail; if it holds the rate grows by half until one fails or
   ``--max-rps`` holds (the target was not saturated).
3. *Narrowing*: bisection between the highest rate held and the lowest failed, until they
   are within ``resolution`` of each other. The knee is the highest rate held; the
   interval is [held, failed).

Each step is judged by :mod:`.sweep_step` (repeated twice as long while too imprecise to
decide, up to ``max_step_s``). A target that stops answering, Ctrl-C, and the time
budget each end the sweep with the steps done kept and the outcome said in one line.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InferPlanError, UsageError
from ..core.schema import Gate, LoadTestResult, SweepResult, SweepStep
from ..sim.results.sinks import RequestWriter
from .spec import LoadTestSpec

if TYPE_CHECKING:
    from ..core.records import RequestRecords
    from .run import Measured
from .sweep_step import judge, sweep_step
from .target import check_reachable

__all__ = ["SweepSpec", "TargetFailedError", "run_sweep", "simulated_knee"]

PROBE_BURST_S = 0.5  # the probe's requests leave within this
LOW_HALVINGS = 4
OVER_SATURATION = 1.1
GROWTH = 1.5
DRAIN_ALLOWANCE = 1.5  # a step costs about this many times its length (warm-up, drain, analysis)

Progress = Callable[[str], None]


class TargetFailedError(InferPlanError):
    """The target stopped answering during the sweep."""


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: ``base`` is the load test of one step (its duration is a step's; its rate the lowest, 0: auto)."""

    base: LoadTestSpec
    rates: tuple[float, ...] = ()
    max_rps: float | None = None
    max_duration_s: float = 600.0
    precision: float = 0.10
    resolution: float = 0.05
    max_step_s: float | None = None  # None: four times the step
    probe_requests: int | None = None  # None: about two seconds of the known model's throughput, else 100
    min_knee_rps: float | None = None

    def __post_init__(self) -> None:
        if self.base.workload.is_replay or len(self.base.workload.schedule.segments) > 0:
            raise UsageError("a sweep offers steady rates: drop --spike, a trace or a timed dataset", field="sweep")
        if self.base.workers > 0:
            raise UsageError("a sweep runs its steps in this process: drop --workers", field="workers")
        saved = self.base.save_requests
        if saved is not None and not saved.parent.is_dir():
            raise UsageError(f"cannot write {saved}: no such folder", field="save-requests")
        if any(r <= 0 for r in self.rates):
            raise UsageError("every rate must be > 0", field="rates")
        if self.max_rps is not None and self.rates and max(self.rates) > self.max_rps:
            raise UsageError("a rate above --max-rps was listed", field="rates")

    @property
    def longest_step_s(self) -> float:
        return self.max_step_s if self.max_step_s is not None else 4 * self.base.duration_s


class _Search:
    """The steps run so far and the budget they spend."""

    def __init__(self, spec: SweepSpec, url: str, progress: Progress) -> None:
        self.spec, self.url, self.progress = spec, url, progress
        self.started = time.monotonic()
        self.steps: list[SweepStep] = []
        self.saturation: float | None = None
        self.probe_requests = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def affords(self, seconds: float) -> bool:
        return self.elapsed() + DRAIN_ALLOWANCE * (seconds + self.spec.base.warmup_s) <= self.spec.max_duration_s

    def _run(self, rps: float, duration_s: float, warmup_s: float | None = None) -> Measured:
        base = self.spec.base
        spec = replace(
            base, target=self.url, gpus=base.fleet, workload=base.workload.at_rate(rps), duration_s=duration_s,
            warmup_s=base.warmup_s if warmup_s is None else warmup_s, save_requests=None,
        )  # fmt: skip
        from .run import measure_loadtest  # Locust: imported where load is sent (gevent patches on import)

        measured = measure_loadtest(spec)
        _check_alive(self.url, measured.result)
        return measured

    def probe(self) -> float:
        """Answers per second of a burst: the target's throughput."""
        count = self.spec.probe_requests or _probe_size(self.spec.base)
        self.progress(f"saturation probe: {count} requests at once")
        measured = self._run(count / PROBE_BURST_S, PROBE_BURST_S, warmup_s=0.0)
        rec = measured.records
        ok = rec.ok
        self.probe_requests = len(rec)
        if not ok.any():
            raise TargetFailedError(f"no request of the saturation probe was answered: {_why(measured.result)}")
        span = float(rec.finished[ok].max() - rec.sent[ok].min())
        self.saturation = int(ok.sum()) / max(span, 1e-3)
        return self.saturation

    def step(self, rps: float) -> SweepStep | None:
        """Run one rate, repeated longer while undecided; None when the budget cannot afford its first run."""
        duration, runs = self.spec.base.duration_s, 0
        if not self.affords(duration):
            return None
        while True:
            runs += 1
            previous = f"; last P95 {self.steps[-1].p95_ms:,.0f} ms" if self.steps and self.steps[-1].p95_ms else ""
            self.progress(f"step {len(self.steps) + 1}: {rps:,.2f} req/s for {duration:g} s{previous}")
            measured = self._run(rps, duration)
            verdict = judge(measured.result, measured.records, self.spec.base.model.slos, self.spec.precision)
            longer = 2 * duration
            if verdict.decided or longer > self.spec.longest_step_s or not self.affords(longer):
                step = sweep_step(rps, measured.result, verdict, runs, verdict.decided_by or "limit")
                if self.spec.base.save_requests is not None:
                    step.requests_file = str(self._save(measured.records, len(self.steps) + 1))
                self.steps.append(step)
                return step
            duration = longer

    def _save(self, records: RequestRecords, number: int) -> Path:
        """``--save-requests sweep.csv`` keeps step N's deciding run in ``sweep-stepN.csv``: each run has its own
        clock, so one file per run is what ``calibrate --from-requests`` can replay."""
        path = step_requests_path(self.spec.base.save_requests, number)
        writer = RequestWriter(path)
        writer.fold(records)
        writer.close()
        return path


def step_requests_path(save_requests: Path, number: int) -> Path:
    """Where a sweep keeps the requests of its step ``number`` (1-based)."""
    return save_requests.with_name(f"{save_requests.stem}-step{number}{save_requests.suffix or '.csv'}")


def run_sweep(spec: SweepSpec, *, progress: Progress | None = None) -> SweepResult:
    """Find the knee (see the module docstring); the steps done are in the result whatever ends the sweep."""
    from .run import target_url

    say = progress or (lambda _: None)
    with target_url(spec.base) as url:
        check_reachable(url)
        search = _Search(spec, url, say)
        try:
            outcome, message = _search(search)
        except KeyboardInterrupt:
            outcome, message = "interrupted", "interrupted (Ctrl-C)"
        except TargetFailedError as err:
            outcome, message = "target_failed", f"the target stopped answering: {err}"
    return _result(spec, search, url, outcome, message)


def _search(s: _Search) -> tuple[str, str]:
    """Run the steps; the outcome and its line."""
    spec = s.spec
    if spec.rates:
        for rps in sorted(spec.rates):
            step = s.step(rps)
            if step is None:
                return "budget", "--max-duration ran out before every listed rate ran"
            if not step.held:
                break
        return _bracketed(s, listed=True)
    top = s.probe() * OVER_SATURATION
    if spec.max_rps is not None:
        top = min(top, spec.max_rps)
    low = spec.base.workload.schedule.rps or top / (2 * OVER_SATURATION)
    for _ in range(LOW_HALVINGS + 1):
        step = s.step(min(low, top))
        if step is None or step.held:
            break
        low /= 2
    if not s.steps or not any(st.held for st in s.steps):
        return _bracketed(s, listed=False)
    while True:  # the top must fail, else grow it
        step = s.step(top)
        if step is None or not step.held:
            break
        if spec.max_rps is not None and top >= spec.max_rps:
            return _bracketed(s, listed=False)
        top = top * GROWTH if spec.max_rps is None else min(top * GROWTH, spec.max_rps)
    while True:  # bisect
        held, failed = _bracket(s.steps)
        if held is None or failed is None or failed - held <= spec.resolution * held:
            break
        if s.step((held + failed) / 2) is None:
            break
    return _bracketed(s, listed=False)


def _bracket(steps: list[SweepStep]) -> tuple[float | None, float | None]:
    """The highest rate held, and the lowest failed above it."""
    held = max((st.rps for st in steps if st.held), default=None)
    above = [st.rps for st in steps if not st.held and (held is None or st.rps > held)]
    return held, min(above, default=None)


def _bracketed(s: _Search, *, listed: bool) -> tuple[str, str]:
    held, failed = _bracket(s.steps)
    spec = s.spec
    if held is None:
        lowest = min((st.rps for st in s.steps), default=math.nan)
        return "below_every_rate", f"no rate held every SLO set; the lowest tried was {lowest:,.2f} req/s"
    if failed is None:
        limit = "the highest listed rate" if listed else f"--max-rps {spec.max_rps:g}"
        return "not_saturated", f"every rate held up to {limit}: the knee is at least {held:,.2f} req/s"
    if not listed and failed - held > spec.resolution * held and not s.affords(spec.base.duration_s):
        return "budget", f"--max-duration ran out: the knee lies in [{held:,.2f}, {failed:,.2f}) req/s"
    return "knee", f"knee {held:,.2f} req/s (in [{held:,.2f}, {failed:,.2f}) req/s)"


def _result(spec: SweepSpec, s: _Search, url: str, outcome: str, message: str) -> SweepResult:
    held, failed = _bracket(s.steps)
    gates = []
    if spec.min_knee_rps is not None:
        value = held or 0.0
        gates.append(Gate(name="min_knee_rps", passed=held is not None and held >= spec.min_knee_rps, value=value,
                          limit=spec.min_knee_rps,
                          detail=f"knee {value:,.2f} req/s (at least {spec.min_knee_rps:g})"))  # fmt: skip
    base = spec.base
    result = SweepResult(
        target=base.target, url=url, gpus=base.fleet, outcome=outcome, message=message,
        knee_rps=held, knee_low_rps=held, knee_high_rps=failed if failed is not None else None,
        saturation_rps=s.saturation, probe_requests=s.probe_requests, slos=base.model.slos.limits,
        precision=spec.precision, step_s=base.duration_s, longest_step_s=spec.longest_step_s, warmup_s=base.warmup_s,
        elapsed_s=s.elapsed(), workload=base.workload.at_rate(0.0).model_dump(mode="json"),
        steps=s.steps, gates=gates,
    )  # fmt: skip
    return result.model_copy(update={"passed": result.measured_a_knee and all(g.passed for g in gates)})


def simulated_knee(spec: SweepSpec, *, resolution: float = 0.02, replications: int = 10) -> float | None:
    """The simulator's knee for the sweep's profile, workload and SLOs (None: no fleet known).

    Simulated for as long as the longest step may run (the steps that decide a knee are
    the ones run that long), averaged over ``replications`` seeds: a 5-second run's
    per-tier P95 is too noisy to bisect on.
    """
    from ..sim.planning.knee import slo_knee_rps
    from ..sim.runner import RunSettings

    base = spec.base
    if base.fleet is None:
        return None
    settings = RunSettings(duration_s=spec.longest_step_s, warmup_s=base.warmup_s, seed=base.seed,
                           replications=replications)  # fmt: skip
    return slo_knee_rps(base.model, base.workload, base.fleet, settings, resolution=resolution)


def _probe_size(base: LoadTestSpec) -> int:
    """About two seconds of the known model's throughput (50 to 2,000 requests); 100 for an unknown target."""
    if base.fleet is None or (base.target != "sim" and base.gpus is None):
        return 100
    rate = base.fleet * base.model.per_gpu_rps(base.workload.shape(base.model))
    return int(min(2000, max(50, round(2 * rate))))


def _why(result: LoadTestResult) -> str:
    top = next(iter(result.failures.items()), None)
    return f"{top[1]:,} x {top[0]}" if top else ", ".join(f"{k}: {v}" for k, v in result.status_counts.items())


def _check_alive(url: str, result: LoadTestResult) -> None:
    """A step with connection failures from a target that no longer accepts connections is a failed target, not
    a failed rate."""
    if not result.status_counts.get("transport_error"):
        return
    with contextlib.suppress(InferPlanError):
        check_reachable(url, timeout_s=2.0)
        return
    raise TargetFailedError(f"{_why(result)}; {url} no longer accepts connections")
