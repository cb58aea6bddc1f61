"""From raw engine records to the reported numbers, warm-up excluded.

Latency is end to end: arrival to the completion of the request's batch. Only requests
that arrive inside the measured window ``[warmup, warmup + duration)`` count, so the
empty-system start does not flatter the percentiles. Percentiles come from the one
latency summary (:func:`infer_plan.core.stats.latency_stats`) a load test uses too.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..core.model import ServiceModel, TokenShape
from ..core.records import Outcome, RequestRecords
from ..core.schema import AutoscaleLog, Interval, SimulationResult, TierStats, TimeSeries
from ..core.stats import Slos, latency_stats, token_stats
from ..core.tiers import Tier
from .engine import EngineOutput, TokenGaps

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
    stream: bool = False,
    lengths: str | None = None,
) -> SimulationResult:
    w0, w1 = warmup_s, warmup_s + duration_s
    lo, hi = np.searchsorted(out.records.scheduled, [w0, w1])
    window = out.records.take(slice(int(lo), int(hi)))
    served = window.ok
    rejected = window.outcome == Outcome.REJECTED
    failed = window.outcome == Outcome.FAILED
    latency_ms = window.latency_ms
    requests = len(window)

    tokens = _TokenWindow(window, out.itl, w0, w1, model) if window.first_token is not None else None
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
            **(tokens.stats(mine & served, int(tier), duration_s) if tokens else {}),
        )

    in_window = (out.batch_start >= w0) & (out.batch_start < w1)
    up_seconds = _up_gpu_seconds(out.up_changes, w0, w1)
    mean_up = up_seconds / duration_s if duration_s > 0 else float(gpus)
    offered = requests / duration_s if duration_s > 0 else 0.0
    completions = out.records.finished[out.records.ok]
    done_in_window = int(((completions >= w0) & (completions < w1)).sum())
    ts = None
    if keep_timeseries and out.timeseries:
        ts = TimeSeries(
            **{k: v.tolist() for k, v in out.timeseries.items()},
            output_tokens_per_s=_tokens_over_time(out.records, out.timeseries["t_s"]),
        )
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
        batching=model.batching.value,
        stream=stream,
        lengths=lengths if tokens else None,
        requests=requests,
        throughput_rps=done_in_window / duration_s if duration_s > 0 else 0.0,
        rejected_fraction=float(rejected.sum() / requests) if requests else 0.0,
        error_fraction=float(failed.sum() / requests) if requests else 0.0,
        load_factor=model.load_factor(offered, mean_up, _shape(out.records)),
        gpu_busy=_busy_seconds(out.batch_start, out.batch_end, w0, w1) / up_seconds if up_seconds else 0.0,
        mean_batch_size=float(out.batch_size[in_window].mean()) if in_window.any() else 0.0,
        batches=int(in_window.sum()),
        per_tier=per_tier,
        timeseries=ts,
        autoscale=autoscale,
        **latency_stats(latency_ms[served], cdf=False).model_dump(),
        **(tokens.stats(served, None, duration_s) if tokens else {}),
    )


class _TokenWindow:
    """The token figures of one window's requests, overall or for one tier."""

    def __init__(self, window: RequestRecords, itl: TokenGaps | None, w0: float, w1: float, model: ServiceModel):
        assert window.first_token is not None and window.output_tokens is not None
        self.ttft_ms = (window.first_token - window.scheduled) * 1000.0
        self.e2e_ms = window.latency_ms
        self.output_tokens = window.output_tokens.astype(np.int64)
        self.slos = Slos(e2e_ms=model.slo_p95_ms, ttft_ms=model.slo_ttft_p95_ms, tpot_ms=model.slo_tpot_p95_ms)
        inside = (itl.at_s >= w0) & (itl.at_s < w1) if itl is not None else None
        self.gaps_ms = itl.gaps_ms[inside] if itl is not None else np.empty(0)
        self.gap_counts = itl.counts[inside] if itl is not None else np.empty((0, 3), np.int64)

    def stats(self, mask: np.ndarray, tier: int | None, duration_s: float) -> dict[str, object]:
        counts = self.gap_counts.sum(axis=1) if tier is None else self.gap_counts[:, tier]
        return token_stats(
            ttft_ms=self.ttft_ms[mask],
            e2e_ms=self.e2e_ms[mask],
            output_tokens=self.output_tokens[mask],
            gaps_ms=self.gaps_ms,
            gap_counts=counts,
            duration_s=duration_s,
            slos=self.slos,
        ).model_dump()


def _shape(records: RequestRecords) -> TokenShape | None:
    if records.prompt_tokens is None or records.output_tokens is None or len(records) == 0:
        return None
    return TokenShape(float(records.prompt_tokens.mean()), float(records.output_tokens.mean()))


def _tokens_over_time(records: RequestRecords, t_s: np.ndarray) -> list[float]:
    """Output tokens of the requests completing in each sampling interval, per second."""
    if records.output_tokens is None or t_s.size < 2:
        return []
    done = records.ok
    edges = np.append(t_s, t_s[-1] + (t_s[-1] - t_s[-2]))
    tokens, _ = np.histogram(records.finished[done], bins=edges, weights=records.output_tokens[done])
    return (tokens / np.diff(edges)).tolist()
