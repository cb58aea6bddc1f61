"""From a run's tally to the reported numbers, warm-up excluded.

Latency is end to end: arrival to the completion of the request's batch. Only requests
that arrive inside the measured window ``[warmup, warmup + duration)`` count, so the
empty-system start does not flatter the percentiles. Percentiles come from the tally's
log histograms (:mod:`infer_plan.core.histogram`: within 0.5% of the exact ones), so a
run of any length summarises in the same few megabytes.
"""

from __future__ import annotations

import numpy as np

from ...core.model import ServiceModel, TokenShape
from ...core.schema import AutoscaleLog, Interval, SimulationResult, TierStats, TimeSeries
from ...core.tiers import Tier
from .fleet_log import FleetLog
from .tally import Tally, student_t

__all__ = ["interval", "summarise"]


def interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean and prediction interval of one more run."""
    n = values.size
    mean = float(values.mean())
    if n < 2:
        return Interval(mean=mean, ci95_low=mean, ci95_high=mean, pi95_low=mean, pi95_high=mean)
    sd = float(values.std(ddof=1))
    t = student_t(0.5 + level / 2, n - 1)
    half_ci = t * sd / np.sqrt(n)
    half_pi = t * sd * np.sqrt(1 + 1 / n)
    return Interval(
        mean=mean, ci95_low=mean - half_ci, ci95_high=mean + half_ci, pi95_low=mean - half_pi, pi95_high=mean + half_pi
    )


def _up_gpu_seconds(up_changes: np.ndarray, w0: float, w1: float) -> float:
    """Integral of the number of serving GPUs over the window (a step function)."""
    times = np.append(up_changes[:, 0], np.inf)
    counts = up_changes[:, 1]
    spans = np.clip(np.minimum(times[1:], w1) - np.maximum(times[:-1], w0), 0.0, None)
    return float((spans * counts).sum())


def summarise(
    tally: Tally,
    fleet: FleetLog,
    model: ServiceModel,
    *,
    gpus: int,
    rps: float,
    seed: int,
    keep_timeseries: bool = True,
    stream: bool = False,
    lengths: str | None = None,
) -> SimulationResult:
    """The result of one run from its tally: the measured window's figures, per tier and overall."""
    w0, w1 = tally.measured
    duration_s = w1 - w0
    per_tier: dict[str, TierStats] = {}
    for tier in Tier:
        n = tally.count("requests", tier)
        per_tier[tier.label] = TierStats(
            requests=n,
            completed=tally.count("completed", tier),
            rejected_fraction=tally.count("rejected", tier) / n if n else 0.0,
            error_fraction=tally.count("failed", tier) / n if n else 0.0,
            **tally.latency_stats(tier),
            **tally.token_stats(tier, duration_s),
        )
    requests = tally.count("requests")
    busy_s, completions, batches, batch_items = tally.window_sums()
    up_seconds = _up_gpu_seconds(fleet.up_changes, w0, w1)
    mean_up = up_seconds / duration_s if duration_s > 0 else float(gpus)
    offered = requests / duration_s if duration_s > 0 else 0.0
    ts = None
    if keep_timeseries and fleet.timeseries:
        ts = TimeSeries(
            **{k: v.tolist() for k, v in fleet.timeseries.items()},
            output_tokens_per_s=_tokens_over_time(tally, fleet.timeseries["t_s"]),
        )
    autoscale = None
    if model.autoscale.enabled:
        autoscale = AutoscaleLog(
            events=fleet.scale_events,
            peak_gpus=int(fleet.up_changes[:, 1].max()),
            peak_load_factor=float(fleet.timeseries["load_factor"].max()) if fleet.timeseries else 0.0,
            scale_up_load=model.autoscale.scale_up_load,
            scale_up_after_s=model.autoscale.scale_up_after_s,
            longest_above_s=fleet.longest_above_s,
        )
    shape = (
        TokenShape(*(total / tally.all_requests for total in (tally.prompt_sum, tally.output_sum, tally.cached_sum)))
        if tally.tokens and tally.all_requests
        else None
    )
    return SimulationResult(
        gpus=gpus,
        rps=rps,
        offered_rps=offered,
        duration_s=duration_s,
        warmup_s=w0,
        seed=seed,
        overlap=model.overlap,
        batching=model.batching.value,
        stream=stream,
        lengths=lengths if tally.tokens else None,
        requests=requests,
        throughput_rps=completions / duration_s if duration_s > 0 else 0.0,
        rejected_fraction=tally.count("rejected") / requests if requests else 0.0,
        error_fraction=tally.count("failed") / requests if requests else 0.0,
        load_factor=model.load_factor(offered, mean_up, shape),
        gpu_busy=busy_s / up_seconds if up_seconds else 0.0,
        mean_batch_size=batch_items / batches if batches else 0.0,
        batches=batches,
        per_tier=per_tier,
        timeseries=ts,
        autoscale=autoscale,
        precision=tally.report,
        **tally.latency_stats(None, cdf=False),
        **tally.token_stats(None, duration_s),
    )


def _tokens_over_time(tally: Tally, t_s: np.ndarray) -> list[float]:
    """Output tokens of the requests completing in each sampling interval, per second."""
    if not tally.tokens or t_s.size < 2 or not tally.sample_every_s:
        return []
    per_sample = np.zeros(t_s.size)
    filled = min(t_s.size, tally.tokens_by_sample.size)
    per_sample[:filled] = tally.tokens_by_sample[:filled]
    return (per_sample / tally.sample_every_s).tolist()
