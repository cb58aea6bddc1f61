"""From request records to the load test's result: latency measured and simulated, and the gates.

Latency counts from the *scheduled* send time. Percentiles come from exact per-request
times through the one latency summary (Locust's own stats round to buckets and count
from the actual send, so they are kept beside, not used for gates). The simulation is
the same arrivals run through the simulator: its records line up row by row with the
measured ones, so "which requests count" is one mask for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..calibrate.profile import LinearFit
from ..core.records import Outcome, RequestRecords
from ..core.schema import BatchLogCheck, Gate, LoadTestResult, MeasuredVsSimulated, ServerMetrics
from ..core.slos import Observed, Scope, Slos, check_slos
from ..core.stats import latency_stats, relative_errors
from ..core.tiers import Tier
from .token_analysis import TokenSides, compare_tokens, compare_turns

__all__ = ["Baseline", "BatchLogRerun", "analyse", "evaluate_gates"]


@dataclass(frozen=True)
class Baseline:
    """An earlier run each P95 must stay within ``tolerance`` of (a regression gate, not an SLO)."""

    result: LoadTestResult
    tolerance: float = 0.10


@dataclass(frozen=True)
class BatchLogRerun:
    """The same arrivals simulated with a fit of the batches the server logged during the run."""

    batches: int
    sizes: list[int]
    fit: LinearFit
    simulated: RequestRecords


@dataclass(frozen=True)
class RunFacts:
    """What the result reports about the run besides its records."""

    target: str
    url: str
    gpus: int | None
    rps: float
    duration_s: float
    warmup_s: float
    workers: int
    api: str = "inference"
    stream: bool = False


def _compare(measured: np.ndarray, simulated: np.ndarray | None) -> MeasuredVsSimulated:
    """The same requests both sides; a row the simulation shed (NaN) is left out of its side's summary."""
    m = latency_stats(measured)
    if simulated is None:
        return MeasuredVsSimulated(measured_ms=m)
    s = latency_stats(simulated)
    return MeasuredVsSimulated(measured_ms=m, simulated_ms=s, relative_error=relative_errors(m, s))


def analyse(
    measured: RequestRecords,
    simulated: RequestRecords | None,
    facts: RunFacts,
    slos: Slos,
    *,
    baseline: Baseline | None = None,
    locust: dict[str, dict[str, float]],
    batch_log: BatchLogRerun | None = None,
    tokens: TokenSides | None = None,
    server_metrics: ServerMetrics | None = None,
    failures: dict[str, int] | None = None,
    simulated_fleet: dict[str, list[float]] | None = None,
) -> LoadTestResult:
    window = measured.scheduled >= facts.warmup_s
    ok = measured.ok
    latency = measured.latency_ms
    sim_latency = simulated.latency_ms if simulated is not None else None
    n = int(window.sum())

    def compare(
        mask: np.ndarray, sim: np.ndarray | None = sim_latency, tier: int | None = None, with_tokens: bool = True
    ) -> MeasuredVsSimulated:
        pair = _compare(latency[mask], None if sim is None else sim[mask])
        if tokens is None or not with_tokens:
            return pair
        return pair.model_copy(update={"tokens": compare_tokens(tokens, mask, tier)})

    counted = window & ok
    per_tier = {tier.label: compare(counted & (measured.tier == tier), tier=int(tier)) for tier in Tier}
    statuses, counts = np.unique(measured.status[window], return_counts=True)
    status_counts = {
        ("transport_error" if s == 0 else str(int(s))): int(c) for s, c in zip(statuses, counts, strict=True)
    }
    rejected = int((measured.outcome[window] == Outcome.REJECTED).sum())
    errors = n - int(counted.sum()) - rejected
    result = LoadTestResult(
        target=facts.target,
        url=facts.url,
        gpus=facts.gpus,
        rps=facts.rps,
        duration_s=facts.duration_s,
        warmup_s=facts.warmup_s,
        workers=facts.workers,
        requests=n,
        **_send_rate(measured),
        burst_gap_share=tokens.log.burst_share(np.flatnonzero(counted)) if tokens is not None else None,
        status_counts=status_counts,
        error_rate=errors / n if n else 0.0,
        reject_rate=rejected / n if n else 0.0,
        wrong_outputs=int((measured.outcome == Outcome.WRONG_OUTPUT).sum()),
        per_tier=per_tier,
        overall=compare(counted),
        locust=locust,
        gates=[],
        passed=True,
        latency_over_time=_latency_over_time(measured, simulated, stream=facts.stream),
        simulated_fleet=simulated_fleet,
        batch_log_check=None
        if batch_log is None
        else BatchLogCheck(
            batches=batch_log.batches,
            sizes=batch_log.sizes,
            fixed_ms=batch_log.fit.fixed_ms,
            per_item_ms=batch_log.fit.per_item_ms,
            overall=compare(counted, batch_log.simulated.latency_ms, with_tokens=False),
        ),
        api=facts.api,
        stream=facts.stream,
        token_counts=tokens.log.describe(np.flatnonzero(counted)) if tokens is not None else None,
        server_metrics=server_metrics,
        failures=failures or {},
        turns=compare_turns(tokens, counted) if tokens is not None else [],
    )
    gates = evaluate_gates(result, slos, baseline)
    return result.model_copy(update={"gates": gates, "passed": all(g.passed for g in gates)})


def _send_rate(records: RequestRecords) -> dict[str, float]:
    """Achieved send rate against the plan's, and how late requests left (generator headroom)."""
    sent = records.sent[~np.isnan(records.sent)]
    span = float(sent.max() - sent.min()) if sent.size > 1 else 0.0
    achieved = (sent.size - 1) / span if span > 0 else 0.0
    planned_span = float(records.scheduled.max() - records.scheduled.min()) if len(records) > 1 else 0.0
    planned = (len(records) - 1) / planned_span if planned_span > 0 else 0.0
    lag = records.send_lag_ms[~np.isnan(records.sent)]
    return {
        "achieved_rps": achieved,
        "shortfall": max(0.0, 1 - achieved / planned) if planned else 0.0,
        "send_lag_p95_ms": float(np.percentile(lag, 95)) if lag.size else 0.0,
    }


def _latency_over_time(
    records: RequestRecords, simulated: RequestRecords | None, *, stream: bool, buckets: int = 60
) -> dict[str, list[float | None]]:
    """P95 (and TTFT P95 of a stream) per time slice of the schedule, and the simulation's P95 in the same
    slices: shows a backlog growing under overload, and whether the plan saw it (a spike, an autoscaler)."""
    ok = records.ok
    if not ok.any():
        return {"t_s": [], "p95_ms": []}
    t = records.scheduled[ok]
    series = {"p95_ms": (t, records.latency_ms[ok])}
    if stream and records.first_token is not None:
        series["ttft_p95_ms"] = (t, (records.first_token[ok] - t) * 1000.0)
    if simulated is not None and simulated.ok.any():
        series["simulated_p95_ms"] = (simulated.scheduled[simulated.ok], simulated.latency_ms[simulated.ok])
    edges = np.linspace(t.min(), t.max() + 1e-9, buckets + 1)
    slices = {name: np.digitize(when, edges) - 1 for name, (when, _) in series.items()}
    out: dict[str, list[float | None]] = {"t_s": [], **{name: [] for name in series}}
    for b in range(buckets):
        if not (slices["p95_ms"] == b).any():
            continue
        out["t_s"].append(float((edges[b] + edges[b + 1]) / 2))
        for name, (_, values) in series.items():
            inside = values[slices[name] == b]
            out[name].append(float(np.nanpercentile(inside, 95)) if inside.size else None)
    return out


def evaluate_gates(result: LoadTestResult, slos: Slos, baseline: Baseline | None = None) -> list[Gate]:
    """The SLOs' gates (:func:`~..core.slos.check_slos` over the measured figures), then the baseline's."""
    gates = check_slos(slos, observed(result))
    if baseline is not None:
        gates += _baseline_gates(result, baseline.result, baseline.tolerance)
    return gates


def observed(result: LoadTestResult) -> Observed:
    """The measured column as the SLO check reads it: overall, then each tier that answered."""

    def scope(name: str, stats: MeasuredVsSimulated) -> Scope:
        answered = 0 if stats.measured_ms.p95_ms is None else 1  # a tier held to its SLOs once it was measured
        return Scope(name, stats.measured_ms, stats.tokens.measured if stats.tokens else None, answered)

    return Observed(
        [scope("overall", result.overall), *(scope(t, s) for t, s in result.per_tier.items())],
        error_rate=result.error_rate, reject_rate=result.reject_rate, no_tokens_why=_unmeasured(result),
        wrong_outputs=result.wrong_outputs,
    )  # fmt: skip


def _baseline_gates(result: LoadTestResult, base: LoadTestResult, tolerance: float) -> list[Gate]:
    """Each P95 (E2E; TTFT and ITL where both runs streamed tokens) within ``tolerance`` of the earlier run's."""
    gates = []
    for scope, now, before in [
        ("overall", result.overall, base.overall),
        *[(t, s, base.per_tier.get(t)) for t, s in result.per_tier.items()],
    ]:
        figures = [("p95", "P95", now.measured_ms.p95_ms, before.measured_ms.p95_ms if before else None)]
        if now.tokens is not None and before is not None and before.tokens is not None:
            for key, label in (("ttft_p95_ms", "TTFT P95"), ("itl_p95_ms", "ITL P95")):
                figures.append((key.removesuffix("_ms"), label, getattr(now.tokens.measured, key),
                                getattr(before.tokens.measured, key)))  # fmt: skip
        for name, label, new, old in figures:
            if old is None or new is None:
                continue
            limit = old * (1 + tolerance)
            gates.append(
                Gate(
                    name=f"baseline_{name}_{scope}",
                    passed=new <= limit,
                    value=new,
                    limit=limit,
                    detail=f"{label} {new:.1f} ms vs baseline {old:.1f} ms (+{tolerance:.0%} allowed)",
                )
            )
    return gates


def _unmeasured(result: LoadTestResult) -> str:
    if result.api == "inference":
        return "--api inference has no tokens; use completions or chat"
    return "needs --stream" if not result.stream else "no request of this scope answered with tokens"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
