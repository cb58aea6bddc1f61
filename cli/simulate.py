"""``infer-plan simulate``: one scenario on a fixed fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UsageError
from ..sim.runner import run_simulation
from .options import (
    ArrivalOpt,
    BatchingOpt,
    DatasetFormatOpt,
    DatasetOpt,
    DurationOpt,
    JsonFlagOpt,
    KernelOpt,
    KvPolicyOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    MinDurationOpt,
    NoOverlapOpt,
    OutputTokensOpt,
    PrefixCachingOpt,
    ProfileOpt,
    PromptTokensOpt,
    QuietOpt,
    RoutingOpt,
    SampleGpusOpt,
    SaveOpt,
    SaveRequestsOpt,
    ScenarioOpt,
    SeedOpt,
    SessionsOpt,
    SharedPrefixOpt,
    SpikeOpt,
    StreamOpt,
    ThinkTimeOpt,
    TierMixOpt,
    TokenizerOpt,
    WarmupOpt,
    build_scenario,
    precision_option,
    token_load,
    with_run_flags,
)
from .output import emit_json, render_result
from .parsing import parse_spike
from .progress import status_progress

RateOpt = Annotated[float | None, typer.Option("--rps", min=0, help="Offered rate, requests/s.")]
FleetOpt = Annotated[int | None, typer.Option("--gpus", min=1, help="Fleet size.")]
ReplicationsOpt = Annotated[
    int | None, typer.Option("--replications", "-r", min=1, max=1000, help="Independent runs for confidence intervals.")
]
PrecisionOpt = Annotated[float | None, precision_option("0: off")]
TraceOpt = Annotated[Path | None, typer.Option("--trace", help="Replay arrivals from CSV/JSONL.")]
AutoscaleOpt = Annotated[bool, typer.Option("--autoscale", help="Scale up at 80% load after 120 s, cold start.")]
MtbfOpt = Annotated[float | None, typer.Option("--mtbf-s", min=0.001, help="Mean time between GPU failures.")]
MttrOpt = Annotated[float | None, typer.Option("--mttr-s", min=0.001, help="Mean time to repair a GPU.")]


def simulate(
    rps: RateOpt = None,
    gpus: FleetOpt = None,
    duration: DurationOpt = None,
    warmup: WarmupOpt = None,
    seed: SeedOpt = None,
    replications: ReplicationsOpt = None,
    precision: PrecisionOpt = None,
    min_duration: MinDurationOpt = None,
    sample_gpus: SampleGpusOpt = None,
    arrival: ArrivalOpt = None,
    spike: SpikeOpt = None,
    trace: TraceOpt = None,
    autoscale: AutoscaleOpt = False,
    mtbf_s: MtbfOpt = None,
    mttr_s: MttrOpt = None,
    tier_mix: TierMixOpt = None,
    no_overlap: NoOverlapOpt = False,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    batching: BatchingOpt = None,
    prompt_tokens: PromptTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    dataset: DatasetOpt = None,
    dataset_format: DatasetFormatOpt = None,
    shared_prefix: SharedPrefixOpt = None,
    sessions: SessionsOpt = None,
    think_time: ThinkTimeOpt = None,
    prefix_caching: PrefixCachingOpt = None,
    routing: RoutingOpt = None,
    kv_policy: KvPolicyOpt = None,
    tokenizer: TokenizerOpt = None,
    stream: StreamOpt = False,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonFlagOpt = False,
    save: SaveOpt = None,
    save_requests: SaveRequestsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Simulate the service on a fixed fleet: latency (and tokens, when modelled), load and rejects."""
    faults = {k: v for k, v in (("mtbf_s", mtbf_s), ("mttr_s", mttr_s)) if v is not None}
    scen = build_scenario(
        scenario=scenario, profile=profile, tier_mix=tier_mix, no_overlap=no_overlap, gpus=gpus, max_batch=max_batch,
        max_wait_ms=max_wait_ms, kernel_ms=kernel_ms, autoscale={"enabled": True} if autoscale else None,
        faults=faults or None, batching=batching, prefix_caching=prefix_caching, routing=routing, kv_policy=kv_policy,
    )  # fmt: skip
    workload = scen.workload(
        rps=rps, arrival=arrival, trace=trace, extra_segments=tuple(parse_spike(s) for s in spike or ()),
        **token_load(prompt_tokens, output_tokens, dataset, tokenizer, stream, dataset_format, shared_prefix,
                     sessions, think_time),
    )  # fmt: skip
    if not workload.is_replay and workload.schedule.rps <= 0 and not workload.schedule.segments:
        raise UsageError("give the offered rate with --rps (or [load] rps in a scenario, --trace or a timed --dataset)")
    if (fleet := scen.model.gpus) is None:
        raise UsageError("give the fleet size with --gpus (or [service] gpus in the scenario): 'capacity' finds one")
    settings = scen.settings(duration_s=duration, warmup_s=warmup, seed=seed, replications=replications)
    settings = with_run_flags(settings, precision, min_duration, sample_gpus)
    with status_progress(f"simulating {fleet} GPUs", enabled=not (quiet or json_out)):
        result = run_simulation(scen.model, workload, settings, fleet, save_requests=save_requests)
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_result(result)
