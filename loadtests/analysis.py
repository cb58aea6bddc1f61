"""From raw load-test records to the result: percentiles, the simulator beside them, gates.

Latency counts from the *scheduled* send time. Percentiles are computed from exact
per-request times (Locust's own stats round to buckets and count from the actual
send, so they are kept beside, not used for gates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reports.schema import CDF_POINTS, BatchLogCheck, Gate, LoadTestResult, MeasuredVsSimulated
from ..sim.params import Tier
from ..sim.profile import LinearFit
from .plan import Records

__all__ = ["BatchLogRerun", "GateLimits", "analyse"]

_QUANTILES = {"p50_ms": 50, "p95_ms": 95, "p99_ms": 99}


@dataclass(frozen=True)
class GateLimits:
    slo_p95_ms: float
    max_error_rate: float = 0.001
    max_reject_rate: float = 0.01
    baseline: LoadTestResult | None = None
    baseline_tolerance: float = 0.10


@dataclass(frozen=True)
class BatchLogRerun:
    """The same arrivals simulated with a fit of the batches the server logged during the run."""

    batches: int
    sizes: list[int]
    fit: LinearFit
    simulated_ms: np.ndarray


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return dict.fromkeys(_QUANTILES)
    return {k: float(v) for k, v in zip(_QUANTILES, np.percentile(values, list(_QUANTILES.values())), strict=True)}


def _cdf(values: np.ndarray) -> list[float]:
    return np.percentile(values, CDF_POINTS).tolist() if values.size else []


def _compare(measured: np.ndarray, simulated: np.ndarray | None) -> MeasuredVsSimulated:
    m = _percentiles(measured)
    if simulated is None:
        return MeasuredVsSimulated(measured_ms=m, measured_cdf_ms=_cdf(measured))
    s = _percentiles(simulated)
    err = {k: (abs(m[k] - s[k]) / s[k] if m[k] is not None and s[k] else None) for k in _QUANTILES}
    return MeasuredVsSimulated(
        measured_ms=m,
        simulated_ms=s,
        relative_error=err,
        measured_cdf_ms=_cdf(measured),
        simulated_cdf_ms=_cdf(simulated),
    )


def analyse(
    records: Records,
    *,
    target: str,
    url: str,
    gpus: int | None,
    rps: float,
    duration_s: float,
    warmup_s: float,
    workers: int,
    simulated_ms: np.ndarray | None,
    limits: GateLimits,
    locust: dict[str, dict[str, float]],
    batch_log: BatchLogRerun | None = None,
) -> LoadTestResult:
    window = records.scheduled >= warmup_s
    ok = (records.status == 200) & ~records.wrong_output
    latency = records.latency_ms
    n = int(window.sum())
    per_tier = {}
    for tier in Tier:
        mask = window & ok & (records.tiers == tier)
        sim = simulated_ms[mask] if simulated_ms is not None else None
        per_tier[tier.label] = _compare(latency[mask], sim)
    overall_mask = window & ok
    overall = _compare(latency[overall_mask], simulated_ms[overall_mask] if simulated_ms is not None else None)

    statuses, counts = np.unique(records.status[window], return_counts=True)
    status_counts = {
        ("transport_error" if s == 0 else str(int(s))): int(c) for s, c in zip(statuses, counts, strict=True)
    }
    rejected = int((records.status[window] == 429).sum())
    errors = n - int(ok[window].sum()) - rejected
    sent = records.sent[~np.isnan(records.sent)]
    span = float(sent.max() - sent.min()) if sent.size > 1 else 0.0
    achieved = (sent.size - 1) / span if span > 0 else 0.0
    planned_span = float(records.scheduled.max() - records.scheduled.min()) if records.scheduled.size > 1 else 0.0
    planned = (records.scheduled.size - 1) / planned_span if planned_span > 0 else 0.0
    lag = (records.sent - records.scheduled)[~np.isnan(records.sent)] * 1000.0

    result = LoadTestResult(
        target=target,
        url=url,
        gpus=gpus,
        rps=rps,
        duration_s=duration_s,
        warmup_s=warmup_s,
        workers=workers,
        requests=n,
        achieved_rps=achieved,
        shortfall=max(0.0, 1 - achieved / planned) if planned else 0.0,
        send_lag_p95_ms=float(np.percentile(lag, 95)) if lag.size else 0.0,
        status_counts=status_counts,
        error_rate=errors / n if n else 0.0,
        reject_rate=rejected / n if n else 0.0,
        wrong_outputs=int(records.wrong_output.sum()),
        per_tier=per_tier,
        overall=overall,
        locust=locust,
        gates=[],
        passed=True,
        latency_over_time=_latency_over_time(records, ok),
        batch_log_check=None
        if batch_log is None
        else BatchLogCheck(
            batches=batch_log.batches,
            sizes=batch_log.sizes,
            fixed_ms=batch_log.fit.fixed_ms,
            per_item_ms=batch_log.fit.per_item_ms,
            overall=_compare(latency[overall_mask], batch_log.simulated_ms[overall_mask]),
        ),
    )
    gates = evaluate_gates(result, limits)
    return result.model_copy(update={"gates": gates, "passed": all(g.passed for g in gates)})


def _latency_over_time(records: Records, ok: np.ndarray, buckets: int = 60) -> dict[str, list[float]]:
    """P95 per time slice of the schedule: shows a backlog growing under overload."""
    if not ok.any():
        return {"t_s": [], "p95_ms": []}
    t, lat = records.scheduled[ok], records.latency_ms[ok]
    edges = np.linspace(t.min(), t.max() + 1e-9, buckets + 1)
    which = np.digitize(t, edges) - 1
    out_t, out_p = [], []
    for b in range(buckets):
        sel = lat[which == b]
        if sel.size:
            out_t.append(float((edges[b] + edges[b + 1]) / 2))
            out_p.append(float(np.percentile(sel, 95)))
    return {"t_s": out_t, "p95_ms": out_p}


def evaluate_gates(result: LoadTestResult, limits: GateLimits) -> list[Gate]:
    gates = []

    def p95_gate(name: str, stats: MeasuredVsSimulated) -> None:
        value = stats.measured_ms.get("p95_ms")
        gates.append(
            Gate(
                name=name,
                passed=value is not None and value <= limits.slo_p95_ms,
                value=value,
                limit=limits.slo_p95_ms,
                detail=f"P95 {_ms(value)} ms vs SLO {limits.slo_p95_ms:g} ms",
            )
        )

    p95_gate("p95_overall", result.overall)
    for tier, stats in result.per_tier.items():
        if stats.measured_ms.get("p95_ms") is not None:
            p95_gate(f"p95_{tier}", stats)
    gates.append(
        Gate(
            name="error_rate",
            passed=result.error_rate <= limits.max_error_rate and result.wrong_outputs == 0,
            value=result.error_rate,
            limit=limits.max_error_rate,
            detail=f"{result.error_rate:.3%} errors (limit {limits.max_error_rate:.3%}), "
            f"{result.wrong_outputs} wrong outputs",
        )
    )
    gates.append(
        Gate(
            name="reject_rate",
            passed=result.reject_rate <= limits.max_reject_rate,
            value=result.reject_rate,
            limit=limits.max_reject_rate,
            detail=f"{result.reject_rate:.3%} answered 429 (limit {limits.max_reject_rate:.3%})",
        )
    )
    if limits.baseline is not None:
        base = limits.baseline
        for name, now, before in [
            ("overall", result.overall, base.overall),
            *[(t, s, base.per_tier.get(t)) for t, s in result.per_tier.items()],
        ]:
            old = before.measured_ms.get("p95_ms") if before else None
            new = now.measured_ms.get("p95_ms")
            if old is None or new is None:
                continue
            limit = old * (1 + limits.baseline_tolerance)
            gates.append(
                Gate(
                    name=f"baseline_p95_{name}",
                    passed=new <= limit,
                    value=new,
                    limit=limit,
                    detail=f"P95 {new:.1f} ms vs baseline {old:.1f} ms (+{limits.baseline_tolerance:.0%} allowed)",
                )
            )
    return gates


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
