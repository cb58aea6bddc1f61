"""The result model: one versioned schema for everything infer-plan reports.

Every command builds one of these typed results; renderers (terminal, JSON, Markdown,
HTML) only read them. ``schema_version`` changes whenever a field changes meaning or
disappears, so a saved result can be rendered again later or refused with a clear
message (:func:`load_result`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

__all__ = [
    "SCHEMA_HISTORY",
    "SCHEMA_VERSION",
    "AnyResult",
    "AutoscaleLog",
    "BackOfEnvelope",
    "BatchLogCheck",
    "CalibrationPoint",
    "CalibrationResult",
    "CapacityResult",
    "CapacityRow",
    "HardwareOption",
    "HardwarePlanResult",
    "Interval",
    "KneeFit",
    "LatencyStats",
    "LoadTestResult",
    "Result",
    "ScaleAction",
    "ScaleEvent",
    "ServerMetrics",
    "SimulationResult",
    "StreamCell",
    "SweepResult",
    "SweepStep",
    "TierStats",
    "TokenComparison",
    "TokenStats",
    "TurnFigures",
    "load_result",
]

SCHEMA_VERSION = 11
# What each version added; a saved result of an older version is upgraded on load
# (:func:`_upgrade`; new fields take their defaults, so renderers show less, never something wrong).
SCHEMA_HISTORY = {
    1: "simulate, capacity and loadtest results",
    2: "loadtest latency CDFs (measured and simulated) per tier; calibrate results",
    3: "loadtest batch_log_check (the simulation re-run with the batch times the server logged during the run)",
    4: "one latency summary everywhere: a loadtest's measured_ms/simulated_ms carry max, mean and the CDF (cdf_ms); "
    "calibrate's warmup is warmup_batches; simulate's autoscale log; token-level figures (TTFT, ITL, TPOT, "
    "output tokens/s, goodput) in simulate and capacity",
    5: "loadtest by tokens: api and stream, TTFT/ITL/TPOT/goodput measured and simulated (tokens), where the token "
    "counts came from (token_counts), the target's own metrics over the run (server_metrics), why requests failed "
    "(failures); calibrate's phases (the fixed cost split into PCIe in, kernel, PCIe out)",
    6: "simulate and capacity: how precisely the percentiles are known (precision: batch-means intervals, the "
    "simulated seconds measured); capacity's jobs",
    7: "calibrate of a continuous engine from streamed requests or a load test's requests (mode, stream_cells, "
    "the engine-overhead terms request_overhead_ms and tokenize_ms_per_token, the engine's limits and where each "
    "came from)",
    8: "capacity's constraints named as the objectives are (e2e_p95_ms, max_reject_rate, max_error_rate, "
    "ttft_p95_ms, ...: the fields of Slos) beside max_load",
    9: "loadtest --sweep results (kind sweep: every rate's figures, the knee and its interval, the simulator's knee); "
    "calibrate --from-sweep (mode sweep, knee_fit)",
    10: "capacity over hardware (kind hardware_plan: each GPU x tensor-parallel option's replicas, GPUs, cost, "
    "latencies and binding constraint, ranked, the cost-versus-TTFT frontier marked)",
    11: "loadtest turns (sessions: each turn number's TTFT and prefix-cache hit rate, measured and simulated)",
}

# The constraints' names before version 8, and the objectives' names now.
_V7_CONSTRAINTS = {
    "slo_p95_ms": "e2e_p95_ms",
    "max_reject": "max_reject_rate",
    "slo_ttft_p95_ms": "ttft_p95_ms",
    "slo_itl_p95_ms": "itl_p95_ms",
    "slo_tpot_p95_ms": "tpot_p95_ms",
}

# Percentile points kept for latency CDF plots: fine steps in the tail where SLOs live.
CDF_POINTS: tuple[float, ...] = (*range(0, 95), 95, 96, 97, 98, 99, 99.5, 99.9, 100)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStats(_Model):
    """The one latency summary (:func:`infer_plan.core.stats.latency_stats`); None where nothing was measured."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    cdf_ms: list[float] = Field(default_factory=list, description="latency at each of CDF_POINTS percentiles")


class TokenStats(_Model):
    """Token-level figures (SPEC section 10); all None when tokens are not modelled.

    TTFT is arrival to first token; ITL every gap between a request's consecutive tokens
    (percentiles over all gaps); TPOT (E2E - TTFT) / (output tokens - 1) per request;
    goodput the requests per second whose own TTFT, TPOT and E2E each meet the SLOs set.
    """

    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p95_ms: float | None = None
    itl_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p95_ms: float | None = None
    output_tokens_per_s: float | None = None
    goodput_rps: float | None = None
    prefix_hit_rate: float | None = Field(
        default=None,
        description="prompt tokens found in the prefix cache / prompt tokens, of the requests answered "
        "(SPEC section 13); None: prefix caching off",
    )
    preemptions: int | None = Field(
        default=None,
        description="preemptions of the requests answered (paged KV, SPEC section 13; simulator); None: KV reserved",
    )
    ttft_cdf_ms: list[float] = Field(default_factory=list, description="TTFT at each of CDF_POINTS percentiles")
    itl_cdf_ms: list[float] = Field(default_factory=list, description="ITL at each of CDF_POINTS percentiles")


class TierStats(LatencyStats, TokenStats):
    requests: int = 0
    completed: int = 0
    rejected_fraction: float = 0.0
    error_fraction: float = 0.0


class Interval(_Model):
    """Across replications: mean, 95% confidence interval of the mean, 95% prediction interval of one run."""

    mean: float
    ci95_low: float
    ci95_high: float
    pi95_low: float
    pi95_high: float


class MetricInterval(_Model):
    """A percentile and its 95% batch-means confidence interval."""

    value_ms: float
    low_ms: float
    high_ms: float


class PrecisionReport(_Model):
    """How precisely a run's percentiles are known (``--precision``): batch means over slices of the window."""

    target: float = Field(description="relative half-width asked for, e.g. 0.01")
    reached: float | None = Field(description="the widest relative half-width among the percentiles watched")
    met: bool = Field(description="the run stopped because every watched percentile was that precise")
    measured_s: float = Field(description="simulated seconds measured (after the warm-up)")
    slices: int = Field(description="slices (batches of the batch-means method) measured")
    intervals: dict[str, MetricInterval] = Field(default_factory=dict)


class TimeSeries(_Model):
    t_s: list[float]
    queue_depth: list[float]
    gpus_up: list[float]
    gpus_provisioning: list[float]
    offered_rps: list[float]
    load_factor: list[float]
    output_tokens_per_s: list[float] = Field(
        default_factory=list, description="tokens of the requests completing in each interval, per second"
    )


class ScaleAction(StrEnum):
    ORDERED = "ordered"  # the autoscaler provisioned a GPU; it serves after the cold start
    SERVING = "serving"  # a provisioned GPU finished its cold start
    RELEASED = "released"  # the autoscaler scaled down by one GPU


class ScaleEvent(_Model):
    t_s: float
    action: ScaleAction
    gpus_up: int = Field(description="GPUs serving after the event")
    gpus_cold: int = Field(description="GPUs cold-starting after the event")


class AutoscaleLog(_Model):
    """What the autoscaler did during a run (all of it, warm-up included: a cold start spans both)."""

    events: list[ScaleEvent]
    peak_gpus: int = Field(description="most GPUs serving at once")
    peak_load_factor: float = Field(description="highest load_factor the time-series monitor saw")
    scale_up_load: float = Field(description="the policy's trigger")
    scale_up_after_s: float = Field(description="how long the load must stay above the trigger")
    longest_above_s: float = Field(description="the longest the load stayed above the trigger")


class SimulationResult(LatencyStats, TokenStats):
    kind: Literal["simulate"] = "simulate"
    schema_version: int = SCHEMA_VERSION
    gpus: int
    rps: float = Field(description="planning rate: the schedule's base rate")
    offered_rps: float
    duration_s: float
    warmup_s: float
    seed: int
    replications: int = 1
    overlap: bool = True
    batching: str = "static"
    stream: bool = False
    lengths: str | None = Field(default=None, description="where request lengths came from, when tokens are modelled")
    requests: int
    throughput_rps: float
    rejected_fraction: float
    error_fraction: float
    load_factor: float
    gpu_busy: float
    mean_batch_size: float
    batches: int
    per_tier: dict[str, TierStats]
    intervals: dict[str, Interval] = Field(default_factory=dict)
    timeseries: TimeSeries | None = None
    autoscale: AutoscaleLog | None = Field(default=None, description="set when the run had autoscaling on")
    precision: PrecisionReport | None = Field(default=None, description="set when the run stopped on --precision")
    simulated_gpus: int | None = Field(
        default=None,
        description="set when the run simulated this many of the GPUs at their share of the load (replica sampling); "
        "rates and counts over time are scaled back to the whole fleet",
    )


class BackOfEnvelope(_Model):
    cycle_ms: float = Field(description="static: the batch cycle; continuous: one full decode step")
    per_gpu_rps: float
    tokens_per_s_per_gpu: float | None = Field(default=None, description="output tokens one GPU produces at full load")
    raw_gpus: float
    gpus_at_ceiling: int
    max_load: float
    arithmetic: list[str]


class CapacityRow(_Model):
    gpus: int
    meets: bool
    failed: list[str]
    p95_ms: float | None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    per_tier_p95_ms: dict[str, float | None]
    load_factor: float
    gpu_busy: float
    rejected_fraction: float
    error_fraction: float


class SweepPoint(_Model):
    rps: float
    gpus: int | None
    raw_gpus: float
    gpus_at_ceiling: int
    p95_ms: float | None


class CapacityResult(_Model):
    kind: Literal["capacity"] = "capacity"
    schema_version: int = SCHEMA_VERSION
    gpus: int | None = Field(description="smallest GPU count meeting every constraint; None if none within the limit")
    rps: float
    p95_ms: float | None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    batching: str = "static"
    per_tier_p95_ms: dict[str, float | None]
    load_factor: float | None
    gpu_busy: float | None
    rejected_fraction: float | None
    binding_constraint: str
    constraints: dict[str, float]
    back_of_envelope: BackOfEnvelope
    explanation: list[str]
    neighbours: list[CapacityRow]
    search_limit: int
    duration_s: float
    warmup_s: float
    seed: int
    overlap: bool = True
    precision: PrecisionReport | None = Field(default=None, description="how precisely the answer's run was measured")
    simulations: int = Field(default=0, description="GPU counts simulated by the search (and the sweep)")
    jobs: int = Field(default=1, description="simulations run at once, in worker processes")
    simulated_gpus: int | None = Field(
        default=None, description="set when the answer's run simulated this many of its GPUs at their share of the load"
    )
    sweep: list[SweepPoint] | None = None
    alternatives: list[CapacityResult] = Field(
        default_factory=list, description="the same plan under another batching mode (capacity --batching a,b)"
    )


class TokenComparison(_Model):
    """Token figures of one tier (or all) of a load test: measured, and simulated for the same requests."""

    measured: TokenStats
    simulated: TokenStats | None = None
    relative_error: dict[str, float | None] = Field(
        default_factory=dict, description="|measured - simulated| / simulated of each TTFT, ITL and TPOT percentile"
    )


class ServerMetrics(_Model):
    """The target's own Prometheus gauges sampled during a load test (``--scrape-metrics``)."""

    url: str
    t_s: list[float] = Field(description="seconds into the schedule")
    waiting: list[float | None] = Field(description="requests queued at the target")
    running: list[float | None] = Field(description="requests (sequences) the target was running")
    names: dict[str, str] = Field(description="which metric each series was read from")
    failed_scrapes: int = 0
    gpus: list[float | None] = Field(default_factory=list, description="GPUs serving (an autoscaling server)")
    gpus_provisioning: list[float | None] = Field(
        default_factory=list, description="GPUs ordered, still cold-starting (an autoscaling server)"
    )


class MeasuredVsSimulated(_Model):
    """One tier's (or all's) latency, measured and simulated, and the relative error of P50/P95/P99."""

    measured_ms: LatencyStats
    simulated_ms: LatencyStats | None = None
    relative_error: dict[str, float | None] | None = None
    tokens: TokenComparison | None = Field(default=None, description="load tests of a token API (--api)")


class BatchLogCheck(_Model):
    """The simulation re-run with the batch times the server logged during this load test.

    Read beside the prediction from the profile given: when this one matches the
    measurement and that one does not, the engine's speed changed since it was
    calibrated; when neither matches, the model misses something of this server.
    """

    batches: int
    sizes: list[int] = Field(description="batch sizes seen often enough to enter the fit")
    fixed_ms: float
    per_item_ms: float
    overall: MeasuredVsSimulated


class Gate(_Model):
    name: str
    passed: bool
    value: float | None
    limit: float
    detail: str


class TurnFigures(_Model):
    """One turn of a load test's conversations (SPEC section 13): the same requests measured and simulated."""

    turn: int = Field(description="1: a session's first turn")
    requests: int = Field(description="turns of this number answered in the measured window")
    prompt_tokens_mean: float | None = Field(default=None, description="the prompts' mean length, history included")
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    simulated_ttft_p50_ms: float | None = None
    simulated_ttft_p95_ms: float | None = None
    prefix_hit_rate: float | None = Field(default=None, description="cached prompt tokens the target reported")
    simulated_prefix_hit_rate: float | None = None


class LoadTestResult(_Model):
    kind: Literal["loadtest"] = "loadtest"
    schema_version: int = SCHEMA_VERSION
    target: str
    url: str
    gpus: int | None
    rps: float
    duration_s: float
    warmup_s: float
    workers: int
    requests: int
    achieved_rps: float
    shortfall: float = Field(description="1 - achieved/target send rate")
    send_lag_p95_ms: float
    burst_gap_share: float | None = Field(
        None, description="share of streamed token gaps under 0.1 ms: tokens read at once, the client or the "
        "target's front end behind (ITL and TPOT then time that lag, not the engine's steps); None: nothing streamed"
    )  # fmt: skip
    status_counts: dict[str, int]
    error_rate: float
    reject_rate: float
    wrong_outputs: int
    per_tier: dict[str, MeasuredVsSimulated]
    overall: MeasuredVsSimulated
    locust: dict[str, dict[str, float]]
    gates: list[Gate]
    passed: bool
    latency_over_time: dict[str, list[float | None]] | None = Field(
        default=None, description="P95 per time slice of the schedule: t_s, p95_ms (ttft_p95_ms), simulated_p95_ms"
    )
    simulated_fleet: dict[str, list[float]] | None = Field(
        default=None, description="the simulated autoscaler's GPUs over time: t_s, gpus_up, gpus_provisioning"
    )
    batch_log_check: BatchLogCheck | None = None
    api: str = "inference"
    stream: bool = False
    token_counts: str | None = Field(
        default=None, description="where output token counts came from: the answers' usage, or counted chunks"
    )
    server_metrics: ServerMetrics | None = None
    failures: dict[str, int] = Field(default_factory=dict, description="why requests failed: reason -> how often")
    turns: list[TurnFigures] = Field(default_factory=list, description="sessions: each turn number's figures")


class SweepStep(_Model):
    """One offered rate of ``loadtest --sweep``: what it measured and whether every SLO set held."""

    rps: float = Field(description="offered rate, requests/s")
    duration_s: float = Field(description="seconds of load measured (after the warm-up) in the run that decided")
    runs: int = Field(description="runs at this rate: a run too imprecise to decide is repeated, twice as long")
    requests: int
    achieved_rps: float = Field(description="rate actually sent")
    completed_rps: float = Field(description="answers per second that were OK")
    p50_ms: float | None
    p95_ms: float | None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p95_ms: float | None = None
    goodput_rps: float | None = None
    simulated_p95_ms: float | None = Field(default=None, description="the simulator's P95 for the same arrivals")
    simulated_ttft_p95_ms: float | None = None
    error_rate: float
    reject_rate: float
    held: bool = Field(description="every SLO set held at this rate")
    failed: list[str] = Field(default_factory=list, description="the gates that failed (or why the step is over)")
    precision: float | None = Field(
        default=None, description="relative half-width of the decisive P95's 95% batch-means interval"
    )
    decided_by: str = Field(default="", description="how the verdict was reached: precise, clear, growing, limit")
    requests_file: str | None = Field(
        default=None, description="the deciding run's requests (--save-requests), for calibrate --from-requests"
    )


class SweepResult(_Model):
    """``loadtest --sweep``: the highest offered rate at which every SLO set holds on a real target (its knee)."""

    kind: Literal["sweep"] = "sweep"
    schema_version: int = SCHEMA_VERSION
    target: str
    url: str
    gpus: int | None
    outcome: Literal["knee", "below_every_rate", "not_saturated", "target_failed", "interrupted", "budget"] = Field(
        description="knee: bracketed; below_every_rate: the lowest rate failed; not_saturated: --max-rps held; "
        "target_failed: the target stopped answering; interrupted: Ctrl-C; budget: --max-duration ran out"
    )
    message: str = Field(description="the outcome in one line")
    knee_rps: float | None = Field(description="highest rate measured to hold every SLO set")
    knee_low_rps: float | None = Field(description="the knee lies in [low, high): the highest rate held ...")
    knee_high_rps: float | None = Field(description="... and the lowest rate above it that failed (or saturation)")
    saturation_rps: float | None = Field(default=None, description="answers per second in the saturation probe")
    probe_requests: int = 0
    simulated_knee_rps: float | None = Field(
        default=None, description="the simulator's knee for the same profile, workload, SLOs and step length"
    )
    slos: dict[str, float] = Field(description="the objectives each step was held to")
    precision: float = Field(description="relative half-width asked of each step's decisive P95")
    step_s: float
    longest_step_s: float = Field(description="a step too imprecise to decide ran up to this long")
    warmup_s: float
    elapsed_s: float
    workload: dict[str, Any] = Field(
        default_factory=dict, description="the steps' workload (lengths, tiers, arrivals) at rate 0: what to simulate"
    )
    steps: list[SweepStep]
    gates: list[Gate] = Field(default_factory=list)
    passed: bool = True

    @property
    def measured_a_knee(self) -> bool:
        """Some rate held: the knee (or a lower bound of it) is known, whatever then ended the sweep."""
        return self.outcome in ("knee", "not_saturated", "budget")


class CalibrationPoint(_Model):
    batch_size: int
    prompt_tokens: int | None = Field(default=None, description="each request's prompt (token calibration)")
    output_tokens: int | None = Field(default=None, description="each request's answer (token calibration)")
    median_ms: float
    p95_ms: float
    min_ms: float
    fitted_ms: float


class StreamCell(_Model):
    """One kind of streamed measurement of a continuous engine and what the fitted model makes of it.

    ``lone``: a request alone on the idle engine, its time to first token (overheads and
    one prefill step); ``wake``: the same after the engine idled (the wake's cost too);
    ``decode``: the gap between tokens with ``sequences`` decoding together; ``mixed``:
    what a newcomer of ``prefill_tokens`` prompt tokens and a two-token answer costs
    ``sequences - 1`` decoding sequences, send to end (``calibrate/streamed.py``). From a
    load test's requests (``traffic_``): the median TTFT and decode time over its requests,
    measured and replayed with the fit.
    """

    kind: Literal["lone", "wake", "decode", "mixed", "traffic_ttft", "traffic_decode"]
    sequences: int
    prefill_tokens: int
    context_tokens: int = Field(default=0, description="decode and mixed: each decoding sequence's prompt")
    samples: int
    median_ms: float
    p95_ms: float
    fitted_ms: float


class KneeFit(_Model):
    """``calibrate --from-sweep``: the profile's engine times scaled by one factor until its knee is the measured."""

    sweep: str = Field(description="the loadtest --sweep result read")
    measured_knee_rps: float
    simulated_before_rps: float | None = Field(description="the given profile's simulated knee (None: no rate held)")
    simulated_after_rps: float | None
    factor: float = Field(description="every engine time term multiplied by this")
    simulations: int = Field(description="simulated knees computed by the search")


class CalibrationResult(_Model):
    """A backend's batch latency by batch size (and token lengths), and the costs the simulator uses."""

    kind: Literal["calibrate"] = "calibrate"
    schema_version: int = SCHEMA_VERSION
    backend: str
    model: str | None
    repetitions: int
    warmup_batches: int = Field(description="batches run and discarded before measuring")
    points: list[CalibrationPoint]
    fixed_ms: float
    per_item_ms: float
    decode_step_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    decode_ms_per_seq: float = 0.0
    max_relative_error: float
    mean_relative_error: float
    cycle_jitter: list[float] = Field(default_factory=list, description="batch-time multipliers at quantiles 0..1")
    profile_path: str | None = None
    phases: dict[str, float] | None = Field(
        default=None, description="fixed cost by phase (pcie_in_ms, kernel_ms, pcie_out_ms) if the backend times it"
    )
    mode: Literal["static", "streamed", "requests", "sweep"] = Field(
        default="static",
        description="static batches timed whole; streamed requests; a load test's saved requests; a sweep's knee",
    )
    request_overhead_ms: float = 0.0
    tokenize_ms_per_token: float = 0.0
    admit_ms_per_request: float = 0.0
    idle_wake_ms: float = 0.0
    decode_ms_per_kv_token: float = 0.0
    prefill_ms_per_token_sq: float = 0.0
    stream_cells: list[StreamCell] = Field(default_factory=list)
    limits: dict[str, int] = Field(
        default_factory=dict,
        description="the engine's max_num_seqs, max_batched_tokens, kv_cache_tokens as written to the profile",
    )
    limit_sources: dict[str, str] = Field(default_factory=dict, description="where each limit came from")
    knee_fit: KneeFit | None = None


class HardwareOption(_Model):
    """One (GPU, tensor-parallel degree) a model can run on, planned: a replica is ``tp`` GPUs."""

    gpu: str
    tp: int
    engine: str
    skipped: str | None = Field(default=None, description="why it was not planned (the model does not fit)")
    replicas: int | None = Field(default=None, description="engine replicas the plan needs; None: none met the SLOs")
    gpus: int | None = Field(default=None, description="replicas x tp")
    price_per_gpu_hour: float | None = None
    usd_per_hour: float | None = None
    usd_per_million_output_tokens: float | None = Field(default=None, description="at the planned rate")
    p95_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    binding_constraint: str = ""
    fit_max_relative_error: float | None = Field(default=None, description="the derived step model's, in [0, 1]")
    kv_cache_tokens: int | None = None
    pareto: bool = Field(default=False, description="on the cost-versus-TTFT P95 frontier: none cheaper and faster")
    plan: CapacityResult | None = None


class HardwarePlanResult(_Model):
    """``capacity --model M --gpu a,b --tp 1,2,4,8``: every option planned, cheapest first."""

    kind: Literal["hardware_plan"] = "hardware_plan"
    schema_version: int = SCHEMA_VERSION
    model: str
    engine: str
    rps: float
    output_tokens_per_request: float
    prices: str | None = Field(default=None, description="where the prices came from (--prices FILE); None: no cost")
    ranked_by: str
    options: list[HardwareOption]
    elapsed_s: float
    jobs: int
    ran_on: str = Field(default="this process", description="where the options were planned: processes, Ray")

    @property
    def best(self) -> HardwareOption | None:
        return next((o for o in self.options if o.replicas is not None), None)


Result = Annotated[
    SimulationResult | CapacityResult | LoadTestResult | CalibrationResult | SweepResult | HardwarePlanResult,
    Field(discriminator="kind"),
]
AnyResult = SimulationResult | CapacityResult | LoadTestResult | CalibrationResult | SweepResult | HardwarePlanResult


class _Envelope(BaseModel):
    result: Result


def _measured_vs_simulated_v3(stats: dict[str, Any]) -> dict[str, Any]:
    """Version <= 3 kept the CDFs beside the percentiles; version 4 keeps them inside the one summary."""
    stats = dict(stats)
    measured_cdf, simulated_cdf = stats.pop("measured_cdf_ms", []), stats.pop("simulated_cdf_ms", None)
    stats["measured_ms"] = {**stats["measured_ms"], "cdf_ms": measured_cdf or []}
    if stats.get("simulated_ms") is not None:
        stats["simulated_ms"] = {**stats["simulated_ms"], "cdf_ms": simulated_cdf or []}
    return stats


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A result of an older schema version in today's shape."""
    if data["schema_version"] < 4 and data["kind"] == "calibrate" and "warmup" in data:
        data = {key if key != "warmup" else "warmup_batches": value for key, value in data.items()}
    if data["schema_version"] < 4 and data["kind"] == "loadtest":
        data = dict(data)
        for key in ("overall", "per_tier"):
            if key == "overall" and isinstance(data.get(key), dict):
                data[key] = _measured_vs_simulated_v3(data[key])
            elif isinstance(data.get(key), dict):
                data[key] = {t: _measured_vs_simulated_v3(v) for t, v in data[key].items()}
        if isinstance(data.get("batch_log_check"), dict):
            data["batch_log_check"] = {
                **data["batch_log_check"],
                "overall": _measured_vs_simulated_v3(data["batch_log_check"]["overall"]),
            }
    if data["schema_version"] < 8 and data["kind"] == "capacity":
        data = _constraints_v7(data)
    return {**data, "schema_version": SCHEMA_VERSION}


def _constraints_v7(data: dict[str, Any]) -> dict[str, Any]:
    def renamed(plan: dict[str, Any]) -> dict[str, Any]:
        constraints = {_V7_CONSTRAINTS.get(k, k): v for k, v in (plan.get("constraints") or {}).items()}
        return {**plan, "constraints": constraints}

    data = renamed(data)
    return {**data, "alternatives": [renamed(a) for a in data.get("alternatives") or ()]}


def load_result(path: Path) -> AnyResult:
    """Read a saved result; refuse other schema versions with a message naming the one expected."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"result file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a JSON result ({err})") from err
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{path}: not an infer-plan result (no 'kind' field)")
    version = data.get("schema_version")
    if not isinstance(version, int) or version not in SCHEMA_HISTORY:
        known = ", ".join(str(v) for v in SCHEMA_HISTORY)
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        hint = "upgrade infer-plan to read it" if newer else "re-run the command that produced it"
        raise ConfigError(
            f"{path}: schema_version {version!r} is not supported; this infer-plan reads schema_version "
            f"{known} and writes {SCHEMA_VERSION} ({hint})"
        )
    try:
        upgraded = _upgrade(data)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{path}: invalid {data['kind']} result of schema_version {version}: {err!r}") from err
    try:
        return _Envelope.model_validate({"result": upgraded}).result
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        raise ConfigError(f"{path}: invalid {data['kind']} result at {where}: {first['msg']}") from err
