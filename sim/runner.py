"""One simulation run, end to end: workload in, typed result out, replications included.

A :class:`Workload` says what load arrives (a rate schedule, or a trace to replay) and
a :class:`RunSettings` how long to watch it and with which seed. Together with the
:class:`~infer_plan.core.model.ServiceModel` they are everything a run depends on, so a
run is reproducible from those three objects alone.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import UsageError
from ..core.model import Batching, ServiceModel
from ..core.schema import SimulationResult
from .arrivals import Arrivals
from .engine import simulate_arrivals
from .metrics import interval, summarise
from .workload import Workload

__all__ = ["DEFAULT_WARMUP_S", "RunSettings", "run_simulation"]

DEFAULT_WARMUP_S = 10.0

# Metrics whose spread across replications is reported as intervals.
_INTERVAL_KEYS = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "rejected_fraction", "gpu_busy", "mean_batch_size")


class RunSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    duration_s: float = Field(default=60.0, gt=0, description="measured period")
    warmup_s: float | None = Field(
        default=None, ge=0, description="simulated before the measured period, excluded; None: 10 s, 0 for a trace"
    )
    seed: int = 0
    replications: int = Field(default=1, ge=1, le=1000)
    sample_every_s: float | None = Field(default=None, gt=0)

    def warmup_for(self, workload: Workload) -> float:
        """The warm-up actually used: as given, else none for a replay (it is the window) and 10 s for a rate."""
        if self.warmup_s is not None:
            return self.warmup_s
        return 0.0 if workload.is_replay else DEFAULT_WARMUP_S


def _one_run(
    model: ServiceModel, workload: Workload, settings: RunSettings, gpus: int, seed: int, keep_timeseries: bool
) -> SimulationResult:
    warmup = settings.warmup_for(workload)
    arrivals = workload.arrivals(model, warmup + settings.duration_s, seed)
    _check_some_fit(model, arrivals)
    duration = _trace_window(arrivals) - warmup if workload.is_replay else settings.duration_s
    if duration <= 0:
        raise UsageError(
            f"the trace lasts {arrivals.end_s:.1f} s, not longer than the warm-up of {warmup:g} s", field="warmup_s"
        )
    horizon = warmup + duration
    out = simulate_arrivals(
        model, arrivals, gpus, seed=seed, horizon_s=horizon, sample_every_s=settings.sample_every_s,
        stream=workload.stream,
    )  # fmt: skip
    return summarise(
        out,
        model,
        gpus=gpus,
        rps=workload.schedule.rps,
        warmup_s=warmup,
        duration_s=duration,
        seed=seed,
        keep_timeseries=keep_timeseries,
        stream=workload.stream,
        lengths=workload.describe_lengths() if arrivals.has_tokens else None,
    )


def _check_some_fit(model: ServiceModel, arrivals: Arrivals) -> None:
    """A request longer than the KV cache fails at once (as an engine refuses it); all of them is a mistake."""
    if model.batching is not Batching.CONTINUOUS or model.kv_cache_tokens is None or not len(arrivals):
        return
    assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
    shortest = int((arrivals.prompt_tokens.astype(np.int64) + arrivals.output_tokens).min())
    if shortest > model.kv_cache_tokens:
        raise UsageError(
            f"no request fits the KV cache of {model.kv_cache_tokens:,} tokens: the shortest needs {shortest:,} "
            "(prompt + output)",
            field="kv_cache_tokens",
        )


def _trace_window(arrivals: Arrivals) -> float:
    """A trace's length: to one mean gap past its last request (so the last one counts), or 1 s for one request."""
    n = len(arrivals)
    return arrivals.end_s * n / (n - 1) if n > 1 and arrivals.end_s > 0 else 1.0


def run_simulation(
    model: ServiceModel, workload: Workload, settings: RunSettings, gpus: int, *, keep_timeseries: bool = True
) -> SimulationResult:
    """Simulate ``settings.replications`` independent runs (seeds seed, seed+1, ...).

    With one replication the result is that run. With several, latency and rate
    figures are the means across runs, and ``intervals`` gives each one's 95%
    confidence interval (for the mean) and prediction interval (for one more run).
    """
    runs = [
        _one_run(model, workload, settings, gpus, settings.seed + r, keep_timeseries and r == 0)
        for r in range(settings.replications)
    ]
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    intervals = {}
    means: dict[str, float] = {}
    for key in _INTERVAL_KEYS:
        values = np.array([getattr(r, key) for r in runs if getattr(r, key) is not None], dtype=float)
        if values.size:
            intervals[key] = interval(values)
            means[key] = intervals[key].mean
    per_tier = {}
    for tier, stats in first.per_tier.items():
        tier_means = {}
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "rejected_fraction", "error_fraction"):
            values = [getattr(r.per_tier[tier], key) for r in runs if getattr(r.per_tier[tier], key) is not None]
            if values:
                tier_means[key] = float(np.mean(values))
        per_tier[tier] = stats.model_copy(update=tier_means)
    return first.model_copy(update={**means, "per_tier": per_tier, "replications": len(runs), "intervals": intervals})
