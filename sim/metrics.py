"""From raw engine records to the reported numbers, warm-up excluded.

Latency is end to end: arrival to the completion of the request's batch. Only requests
that arrive inside the measured window ``[warmup, warmup + duration)`` count, so the
empty-system start does not flatter the percentiles. Percentiles come from the one
latency summary (:func:`infer_plan.core.stats.latency_stats`) a load test uses too.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..core.model import ServiceModel
from ..core.records import Outcome
from ..core.schema import AutoscaleLog, Interval, SimulationResult, TierStats, TimeSeries
from ..core.stats import latency_stats
from ..core.tiers import Tier
from .engine import EngineOutput

__all__ = ["interval", "summarise"]


def interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean and prediction interval of one more run."""
    n = values.size
    mean = float(values.mean())
    if n < 2:
        return Interval(mean=mean, ci95_low=mean, ci95_high=mean, pi95_low=mean, pi95_high=mean)
    sd = float(values.std(ddof=1))
    t = float(stats.t.ppf(0.5 + level / 2, n - 1))
    half_ci = t * sd / np.sqrt(n)
    half_pi = t * sd * np.sqrt(1 + 1 / n)
    return Interval(
        mean=mean, ci95_low=mean - half_ci, ci95_high=mean + half_ci, pi95_low=mean - half_pi, pi95_high=mean + half_pi
    )


def _busy_seconds(start: np.ndarray, end: np.ndarray, w0: float, w1: float) -> float:
    return float(np.clip(np.minimum(end, w1) - np.maximum(start, w0), 0.0, None).sum())


def _up_gpu_seconds(up_changes: np.ndarray, w0: float, w1: float) -> float:
    """Integral of the number of serving GPUs over the window (a step function)."""
    times = np.append(up_changes[:, 0], np.inf)
    counts = up_changes[:, 1]
    spans = np.clip(np.minimum(times[1:], w1) - np.maximum(times[:-1], w0), 0.0, None)
    return float((spans * counts).sum())


def summarise(
    out: EngineOutput,
    model: ServiceModel,
    *,
    gpus: int,
    rps: float,
    warmup_s: float,
    duration_s: float,
    seed: int,
    keep_timeseries: bool = True,
) -> SimulationResult:
    w0, w1 = warmup_s, warmup_s + duration_s
    lo, hi = np.searchsorted(out.records.scheduled, [w0, w1])
    window = out.records.take(slice(int(lo), int(hi)))
    served = window.ok
    rejected = window.outcome == Outcome.REJECTED
    failed = window.outcome == Outcome.FAILED
    latency_ms = window.latency_ms
    requests = len(window)

    per_tier: dict[str, TierStats] = {}
    for tier in Tier:
        mine = window.tier == tier
        n = int(mine.sum())
        lat = latency_ms[mine & served]
        per_tier[tier.label] = TierStats(
            requests=n,
            completed=int(lat.size),
            rejected_fraction=float((mine & rejected).sum() / n) if n else 0.0,
            error_fraction=float((mine & failed).sum() / n) if n else 0.0,
            **latency_stats(lat).model_dump(),
        )

    in_window = (out.batch_start >= w0) & (out.batch_start < w1)
    up_seconds = _up_gpu_seconds(out.up_changes, w0, w1)
    mean_up = up_seconds / duration_s if duration_s > 0 else float(gpus)
    offered = requests / duration_s if duration_s > 0 else 0.0
    completions = out.records.finished[out.records.ok]
    done_in_window = int(((completions >= w0) & (completions < w1)).sum())
    ts = None
    if keep_timeseries and out.timeseries:
        ts = TimeSeries(**{k: v.tolist() for k, v in out.timeseries.items()})
    autoscale = None
    if model.autoscale.enabled:
        autoscale = AutoscaleLog(
            events=out.scale_events,
            peak_gpus=int(out.up_changes[:, 1].max()),
            peak_load_factor=float(out.timeseries["load_factor"].max()) if out.timeseries else 0.0,
            scale_up_load=model.autoscale.scale_up_load,
            scale_up_after_s=model.autoscale.scale_up_after_s,
            longest_above_s=out.longest_above_s,
        )
    return SimulationResult(
        gpus=gpus,
        rps=rps,
        offered_rps=offered,
        duration_s=duration_s,
        warmup_s=warmup_s,
        seed=seed,
        overlap=model.overlap,
        requests=requests,
        throughput_rps=done_in_window / duration_s if duration_s > 0 else 0.0,
        rejected_fraction=float(rejected.sum() / requests) if requests else 0.0,
        error_fraction=float(failed.sum() / requests) if requests else 0.0,
        load_factor=model.load_factor(offered, mean_up),
        gpu_busy=_busy_seconds(out.batch_start, out.batch_end, w0, w1) / up_seconds if up_seconds else 0.0,
        mean_batch_size=float(out.batch_size[in_window].mean()) if in_window.any() else 0.0,
        batches=int(in_window.sum()),
        per_tier=per_tier,
        timeseries=ts,
        autoscale=autoscale,
        **latency_stats(latency_ms[served], cdf=False).model_dump(),
    )
