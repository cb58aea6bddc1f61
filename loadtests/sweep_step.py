"""One rate of a sweep: decide whether every SLO set held, only as precisely as the decision needs.

A step is an ordinary load test (:func:`~.run.measure_loadtest`) judged by its gates.
What a sweep adds is confidence: a P95 measured over a few seconds is noisy, and the
knee is exactly where the P95 meets its limit. So each per-request P95 in play (E2E,
and TTFT and TPOT where set) gets a 95% batch-means interval (consecutive requests in
ten batches, as ``simulate --precision`` does with slices of time). A verdict is

- *clear* when every interval lies on one side of its limit (or a gate without an
  interval failed: errors, 429s, a tier, ITL, goodput);
- *growing* when the latency of the step's last third is over the limit and twice its
  first third's: the queue grows through the step, so a longer run would only fail worse;
- *precise* when the intervals straddle a limit but are within the asked precision:
  the point estimate decides;
- otherwise undecided: the sweep runs the rate again twice as long (up to its longest
  step), and the point estimate of the last run decides when it may not (*limit*).

ITL's P95 is over every gap, not per request, so it is judged by its point estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.records import RequestRecords
from ..core.schema import LoadTestResult, SweepStep
from ..core.slos import Slos
from ..core.stats import own_tpot_ms
from ..core.tiers import Tier
from ..sim.results.tally import student_t

__all__ = ["Verdict", "judge", "p95_interval", "sweep_step"]

BATCHES = 10
MIN_PER_BATCH = 5  # fewer requests per batch make its P95 its maximum
MIN_BATCHES = 4
GROWTH = 2.0  # last third's median over the first third's: the queue is growing


@dataclass(frozen=True)
class Verdict:
    held: bool
    failed: list[str]
    decided_by: str  # clear, growing, precise, or "" while undecided (run longer)
    precision: float | None  # the widest relative half-width among the P95s near their limits

    @property
    def decided(self) -> bool:
        return bool(self.decided_by)


def p95_interval(values_ms: np.ndarray) -> tuple[float, float, float]:
    """P95 of values in send order and its 95% batch-means interval (low, high).

    Too few values for batch means (a tier that sent a handful): the interval is their
    whole range, so only values all on one side of a limit decide.
    """
    value = float(np.percentile(values_ms, 95))
    k = min(BATCHES, values_ms.size // MIN_PER_BATCH)
    if k < MIN_BATCHES:
        return value, float(values_ms.min()), float(values_ms.max())
    p95s = np.array([np.percentile(batch, 95) for batch in np.array_split(values_ms, k)])
    half = student_t(0.975, k - 1) * float(p95s.std(ddof=1)) / math.sqrt(k)
    return value, value - half, value + half


def _per_request_p95s(records: RequestRecords, slos: Slos, warmup_s: float) -> dict[str, tuple[np.ndarray, float]]:
    """Each per-request latency held to a P95, overall and per tier, by its gate's name (as
    :func:`~..core.slos.check_slos` names them): the measured OK requests' values in send order, and the limit."""
    rows = np.flatnonzero((records.scheduled >= warmup_s) & records.ok)
    rows = rows[np.argsort(records.scheduled[rows], kind="stable")]
    e2e = records.latency_ms[rows]
    values = {"p95": (e2e, slos.e2e_p95_ms)}
    if records.first_token is not None and not np.isnan(records.first_token[rows]).all():
        ttft = (records.first_token[rows] - records.scheduled[rows]) * 1000.0
        if slos.ttft_p95_ms is not None:
            values["ttft_p95"] = (ttft, slos.ttft_p95_ms)
        if slos.tpot_p95_ms is not None and records.output_tokens is not None:
            values["tpot_p95"] = (own_tpot_ms(e2e, ttft, records.output_tokens[rows]), slos.tpot_p95_ms)
    metrics = {f"{name}_overall": pair for name, pair in values.items()}
    tiers = records.tier[rows]
    for tier in Tier if slos.hold_tiers else ():
        mine = tiers == tier
        if mine.any():
            for name, (column, limit) in values.items():
                own = slos.e2e_for(tier.label) if name == "p95" else limit
                metrics[f"{name}_{tier.label}"] = (column[mine], own)
    return metrics


def _growing(values_ms: np.ndarray, limit: float) -> bool:
    """The last third's median is twice the first third's and its P95 is over the limit: a queue building up."""
    if values_ms.size < 3 * MIN_PER_BATCH:
        return False
    first, _, last = np.array_split(values_ms, 3)
    return float(np.median(last)) > GROWTH * float(np.median(first)) and float(np.percentile(last, 95)) > limit


def judge(result: LoadTestResult, records: RequestRecords, slos: Slos, precision: float) -> Verdict:
    """Whether every SLO held at this rate, and how surely (see the module docstring)."""
    failed = [g.name for g in result.gates if not g.passed]
    metrics = _per_request_p95s(records, slos, result.warmup_s)
    if any(_growing(values, limit) for values, limit in metrics.values()):
        return Verdict(False, [*failed, "growing"] if "growing" not in failed else failed, "growing", None)
    intervals = {name: p95_interval(values) for name, (values, _) in metrics.items() if values.size}
    widest = max((_relative(*i) for i in intervals.values()), default=None)
    if any(name not in intervals for name in failed):
        return Verdict(False, failed, "clear", widest)
    straddling = [_relative(*i) for name, i in intervals.items() if i[1] <= metrics[name][1] < i[2]]
    if not straddling:
        return Verdict(not failed, failed, "clear", widest)
    near = max(straddling)
    return Verdict(not failed, failed, "precise" if near <= precision else "", near)


def _relative(value: float, low: float, high: float) -> float:
    return (high - low) / 2 / value if value > 0 else math.inf


def sweep_step(rps: float, result: LoadTestResult, verdict: Verdict, runs: int, decided_by: str) -> SweepStep:
    """The step as the sweep's result keeps it."""
    overall, tokens = result.overall, result.overall.tokens
    measured = tokens.measured if tokens is not None else None
    completed = sum(v for k, v in result.status_counts.items() if k == "200")
    return SweepStep(
        rps=rps,
        duration_s=result.duration_s,
        runs=runs,
        requests=result.requests,
        achieved_rps=result.achieved_rps,
        completed_rps=completed / result.duration_s if result.duration_s > 0 else 0.0,
        p50_ms=overall.measured_ms.p50_ms,
        p95_ms=overall.measured_ms.p95_ms,
        ttft_p50_ms=measured.ttft_p50_ms if measured else None,
        ttft_p95_ms=measured.ttft_p95_ms if measured else None,
        itl_p50_ms=measured.itl_p50_ms if measured else None,
        itl_p95_ms=measured.itl_p95_ms if measured else None,
        goodput_rps=measured.goodput_rps if measured else None,
        simulated_p95_ms=overall.simulated_ms.p95_ms if overall.simulated_ms else None,
        simulated_ttft_p95_ms=tokens.simulated.ttft_p95_ms if tokens is not None and tokens.simulated else None,
        error_rate=result.error_rate,
        reject_rate=result.reject_rate,
        held=verdict.held,
        failed=verdict.failed,
        precision=verdict.precision,
        decided_by=decided_by,
    )
