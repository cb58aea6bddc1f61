"""One simulation run, end to end: workload in, typed result out, replications included.

A :class:`Workload` says what load arrives (a rate schedule, or a trace to replay) and
a :class:`RunSettings` how long to watch it and with which seed. Together with the
:class:`~infer_plan.core.model.ServiceModel` they are everything a run depends on, so a
run is reproducible from those three objects alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import UsageError
from ..core.model import Batching, Routing, ServiceModel
from ..core.schema import SimulationResult
from ..core.tiers import Tier
from .engines.compiled_steps import compiled_applies
from .engines.engine import simulate_chunks
from .inputs.arrivals import ArrivalProcess, Arrivals, split
from .inputs.workload import Workload
from .results.sinks import RequestWriter, Tee
from .results.summary import interval, summarise
from .results.tally import Precision, Tally, Watch

__all__ = [
    "DEFAULT_SAMPLE_GPUS",
    "DEFAULT_WARMUP_S",
    "MAX_RUN_REQUESTS",
    "RunSettings",
    "check_run_size",
    "default_watch",
    "run_simulation",
    "sampled_gpus",
]

DEFAULT_WARMUP_S = 10.0

# Continuous batching on more GPUs than this simulates this many at their share of the load (:func:`sampled_gpus`).
# Measured (docs/planning.md, tests/sim/test_replica_sampling.py): from 24 sampled GPUs on, every P95 of 128 GPUs is
# reproduced to the histogram's bucket; 16 put TTFT P95 up to 10% low.
DEFAULT_SAMPLE_GPUS = 24

# The most requests one run may simulate, decided before it starts. The static engine and continuous batching's
# compiled loop fold requests as they settle (memory bounded) and go through about 3 and 2 million a second here, so
# their bound is time: a billion, a hundred million. The interpreted continuous engine (a model the compiled loop
# does not run: failures, the autoscaler, a measured step spread) holds every arrival of its run (about 600 bytes
# each, measured) and goes through about 100,000 a second, so ten million is about 6 GB and two minutes.
MAX_RUN_REQUESTS = {Batching.STATIC: 1_000_000_000, Batching.CONTINUOUS: 100_000_000}
MAX_INTERPRETED_CONTINUOUS = 10_000_000

# Metrics whose spread across replications is reported as intervals.
_INTERVAL_KEYS = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "rejected_fraction", "gpu_busy", "mean_batch_size")


class RunSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    duration_s: float = Field(default=60.0, gt=0, description="measured period; with precision, the longest")
    warmup_s: float | None = Field(
        default=None, ge=0, description="simulated before the measured period, excluded; None: 10 s, 0 for a trace"
    )
    seed: int = 0
    replications: int = Field(default=1, ge=1, le=1000)
    sample_every_s: float | None = Field(default=None, gt=0)
    precision: float | None = Field(
        default=None, gt=0, lt=1, description="stop once every P95 in play is known within this relative half-width"
    )
    min_duration_s: float = Field(default=10.0, gt=0, description="with precision: measure at least this long")
    sample_gpus: int | None = Field(
        default=DEFAULT_SAMPLE_GPUS,
        ge=1,
        description="continuous batching on more GPUs: simulate this many at their share of the load; None: all",
    )

    def warmup_for(self, workload: Workload) -> float:
        """The warm-up actually used: as given, else none for a replay (it is the window) and 10 s for a rate."""
        if self.warmup_s is not None:
            return self.warmup_s
        return 0.0 if workload.is_replay else DEFAULT_WARMUP_S


def default_watch(model: ServiceModel) -> tuple[Watch, ...]:
    """The percentiles a precision stop waits for: every P95 the model's SLOs hold, overall and (unless the SLOs
    hold the overall figures only) per tier."""
    slos = model.slos
    metrics = ["e2e"] + [key.removesuffix("_p95_ms") for key in slos.token_p95s]
    tiers: list[int | None] = [None] + ([int(t) for t in Tier] if slos.hold_tiers else [])
    return tuple(Watch(metric, tier) for metric in metrics for tier in tiers)


def sampled_gpus(model: ServiceModel, workload: Workload, settings: RunSettings, gpus: int) -> int:
    """How many of ``gpus`` GPUs a run simulates: all, or ``settings.sample_gpus`` at their share of the load.

    Continuous batching's GPUs share nothing but the waiting room: a waiting request is taken at the next step end
    of any GPU with room and then served by that GPU alone. Below saturation, where plans live, K of N GPUs offered
    K/N of a Poisson load (what a random split gives each share) see what each of the N sees, but for the pooling
    of the waiting room across more GPUs, which stops mattering at a few dozen. So a fleet of ten thousand costs a
    run of two dozen. Every GPU is simulated where the fleet is coupled otherwise: the static batch cycle (its
    batches fill at the whole fleet's rate), the fleet-wide autoscaler, a fixed queue limit, a replayed trace or
    constant arrivals (a share of either is not the same process at a lower rate), and routing at arrival (round
    robin spreads the fleet's arrivals, prefix affinity what each replica caches, over all N).
    """
    sample = settings.sample_gpus
    if (
        sample is None
        or gpus <= sample
        or model.batching is not Batching.CONTINUOUS
        or model.routing is not Routing.SHARED_QUEUE
        or model.autoscale.enabled
        or model.backpressure.queue_limit is not None
        or workload.is_replay
        or workload.arrival is not ArrivalProcess.POISSON
    ):
        return gpus
    return sample


def _share_of(workload: Workload, fraction: float) -> Workload:
    return workload.model_copy(update={"schedule": workload.schedule.scaled(fraction)})


def _whole_fleet(result: SimulationResult, gpus: int, offered_rps: float) -> SimulationResult:
    """A sampled run's result for the whole fleet: latencies as simulated, rates and counts over time scaled up.

    The offered rate, and the load factor with it, is the schedule's (``offered_rps``): the sample's own count
    wobbles by its size's Poisson noise, far more than a whole fleet's would, and it would make the load ceiling,
    a planning margin, pass at N GPUs and fail at N + 1.
    """
    k = result.gpus
    scale = gpus / k

    def scaled(value: float | None) -> float | None:
        return value * scale if value is not None else None

    per_tier = {
        tier: stats.model_copy(
            update={key: scaled(getattr(stats, key)) for key in ("output_tokens_per_s", "goodput_rps")}
        )
        for tier, stats in result.per_tier.items()
    }
    measured = result.offered_rps * scale
    update: dict[str, object] = {
        key: scaled(getattr(result, key)) for key in ("throughput_rps", "output_tokens_per_s", "goodput_rps")
    }
    update |= {
        "rps": result.rps * scale,
        "gpus": gpus,
        "simulated_gpus": k,
        "per_tier": per_tier,
        "offered_rps": offered_rps,
        "load_factor": result.load_factor * offered_rps / measured if measured > 0 else result.load_factor,
    }
    if result.timeseries is not None:
        series = result.timeseries
        counts = ("queue_depth", "gpus_up", "gpus_provisioning", "offered_rps", "output_tokens_per_s")
        update["timeseries"] = series.model_copy(
            update={key: [v * scale for v in getattr(series, key)] for key in counts if getattr(series, key)}
        )
    return result.model_copy(update=update)


def check_run_size(model: ServiceModel, workload: Workload, settings: RunSettings, gpus: int) -> None:
    """Refuse, in one line and before any work, a run on ``gpus`` GPUs with more requests than one run can hold.

    The continuous engine holds its whole horizon's arrivals from the start, but only its sampled GPUs' share
    (:func:`sampled_gpus`); the static engine's cost is its time, and with a precision stop it may end after
    ``min_duration_s``. A replay is its file, already read.
    """
    if workload.is_replay:
        return
    warmup = settings.warmup_for(workload)
    if (sample := sampled_gpus(model, workload, settings, gpus)) < gpus:
        workload = _share_of(workload, sample / gpus)
    sessions = workload.sessions is not None  # the interpreted engine's, as traces' hash ids are with caching
    keyed = sessions or workload.trace is not None or workload.dataset is not None
    streams = model.batching is Batching.STATIC or (compiled_applies(model, prefixes=keyed) and not sessions)
    stops_early = settings.precision is not None and streams
    horizon = warmup + (min(settings.min_duration_s, settings.duration_s) if stops_early else settings.duration_s)
    requests = workload.schedule.mean_rate(0.0, horizon) * horizon * workload.requests_per_arrival
    limit = MAX_RUN_REQUESTS[model.batching] if streams else MAX_INTERPRETED_CONTINUOUS
    if requests <= limit:
        return
    ways = "a shorter --duration and --warmup, or a lower --rps on proportionally fewer GPUs"
    if streams and settings.precision is None:
        ways = "--precision 0.01 with a short --min-duration (the run stops once its P95s are known), " + ways
    raise UsageError(
        f"{workload.schedule.rps:,.0f} req/s for {horizon:g} s (warm-up included) is {requests:,.0f} requests, more "
        f"than one {model.batching.value} run holds ({limit:,}): use {ways}",
        field="rps",
    )


def _one_run(
    model: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    gpus: int,
    seed: int,
    keep_timeseries: bool,
    watch: tuple[Watch, ...] | None,
    save_requests: Path | None,
) -> SimulationResult:
    warmup = settings.warmup_for(workload)
    if workload.is_replay:  # a file: its own window, in memory anyway
        arrivals = workload.arrivals(model, 0.0, seed)
        duration = _trace_window(arrivals) - warmup
        if duration <= 0:
            raise UsageError(
                f"the trace lasts {arrivals.end_s:.1f} s, not longer than the warm-up of {warmup:g} s",
                field="warmup_s",
            )
        chunks: Iterable[Arrivals] = split(arrivals, 1.0)
        tokens = arrivals.has_tokens
    else:
        duration = settings.duration_s
        chunks = workload.arrival_chunks(model, warmup + duration, seed)
        tokens = workload.wants_tokens(model)
    if model.batching is Batching.CONTINUOUS:
        chunks = _checked_fit(model, chunks)
    horizon = warmup + duration
    every = settings.sample_every_s if settings.sample_every_s is not None else max(1.0, horizon / 600.0)
    precision = (
        Precision(settings.precision, settings.min_duration_s, watch or default_watch(model))
        if settings.precision
        else None
    )
    tally = Tally(model, warmup, duration, tokens=tokens, precision=precision, sample_every_s=every)
    writer = RequestWriter(save_requests) if save_requests is not None else None
    try:
        fleet = simulate_chunks(
            model, chunks, gpus, Tee(tally, writer) if writer else tally, seed=seed, horizon_s=horizon,
            sample_every_s=every, stream=workload.stream, tokens=tokens, shape=workload.shape(model),
        )  # fmt: skip
    finally:
        if writer is not None:
            writer.close()
    tally.finish()
    return summarise(
        tally, fleet, model, gpus=gpus, rps=workload.schedule.rps, seed=seed, keep_timeseries=keep_timeseries,
        stream=workload.stream, lengths=workload.describe_lengths() if tokens else None,
    )  # fmt: skip


def _checked_fit(model: ServiceModel, chunks: Iterable[Arrivals]) -> Iterator[Arrivals]:
    """The chunks as they are, but a first chunk of which no request fits the KV cache is a mistake, said at once.

    A request longer than the KV cache fails at once (as an engine refuses it); when the first requests all do,
    the cache or the lengths are wrong, and a run would only count refusals.
    """
    checked = model.kv_cache_tokens is None
    for chunk in chunks:
        if not checked and len(chunk):
            assert chunk.prompt_tokens is not None and chunk.output_tokens is not None
            shortest = int((chunk.prompt_tokens.astype(np.int64) + chunk.output_tokens).min())
            if shortest > model.kv_cache_tokens:
                raise UsageError(
                    f"no request fits the KV cache of {model.kv_cache_tokens:,} tokens: the shortest needs "
                    f"{shortest:,} (prompt + output)",
                    field="kv_cache_tokens",
                )
            checked = True
        yield chunk


def _trace_window(arrivals: Arrivals) -> float:
    """A trace's length: to one mean gap past its last request (so the last one counts), or 1 s for one request."""
    n = len(arrivals)
    return arrivals.end_s * n / (n - 1) if n > 1 and arrivals.end_s > 0 else 1.0


def run_simulation(
    model: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    gpus: int,
    *,
    keep_timeseries: bool = True,
    watch: tuple[Watch, ...] | None = None,
    save_requests: Path | None = None,
) -> SimulationResult:
    """Simulate ``settings.replications`` independent runs (seeds seed, seed+1, ...).

    With one replication the result is that run. With several, latency and rate
    figures are the means across runs, and ``intervals`` gives each one's 95%
    confidence interval (for the mean) and prediction interval (for one more run).
    ``settings.precision``: each run stops once the percentiles in ``watch`` (default
    :func:`default_watch`) are that precise. ``save_requests``: every request of the
    first run written to that CSV file as it settles.
    """
    check_run_size(model, workload, settings, gpus)
    sample = gpus if save_requests is not None else sampled_gpus(model, workload, settings, gpus)
    if sample < gpus:  # the result is scaled back to the whole fleet, run by run (so are the intervals)
        share = _share_of(workload, sample / gpus)
        warmup = settings.warmup_for(workload)
        offered = workload.schedule.mean_rate(warmup, warmup + settings.duration_s) * workload.requests_per_arrival
        runs = [
            _whole_fleet(_one_run(model, share, settings, sample, settings.seed + r, keep_timeseries and r == 0, watch,
                                  None), gpus, offered)
            for r in range(settings.replications)
        ]  # fmt: skip
        return _combined(runs)
    runs = []
    for r in range(settings.replications):
        first = r == 0
        runs.append(
            _one_run(model, workload, settings, gpus, settings.seed + r, keep_timeseries and first, watch,
                     save_requests if first else None)
        )  # fmt: skip
    return _combined(runs)


def _combined(runs: list[SimulationResult]) -> SimulationResult:
    """One run as it is; several as their means, with intervals."""
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
