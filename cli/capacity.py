"""``infer-plan capacity``: the smallest fleet that meets the SLO, with its arithmetic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import UsageError
from ..core.model import Batching, ServiceModel
from ..core.schema import CapacityResult
from ..core.tiers import Tier
from ..sim.inputs.workload import Workload
from ..sim.planning.planner import plan_batching_modes
from ..sim.runner import RunSettings
from .options import (
    BatchingOpt,
    DatasetFormatOpt,
    DatasetOpt,
    DurationOpt,
    ItlSloOpt,
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
    ScenarioOpt,
    SeedOpt,
    SessionsOpt,
    SharedPrefixOpt,
    SloOpt,
    StreamOpt,
    ThinkTimeOpt,
    TierMixOpt,
    TokenizerOpt,
    TpotSloOpt,
    TtftSloOpt,
    WarmupOpt,
    build_scenario,
    precision_option,
    slo_flags,
    token_load,
    with_run_flags,
)
from .output import emit_json, render_result
from .parsing import parse_tier_mix
from .progress import status_progress

SWEEP_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
NOT_HELD_MS = 3_600_000.0  # an end-to-end P95 of an hour: the E2E objective left out of a hardware search


def _parse_rates(text: str) -> list[float]:
    try:
        rates = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--sweep-rates: comma-separated numbers expected, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise UsageError("--sweep-rates: every rate must be > 0")
    return rates


PlanRateOpt = Annotated[float | None, typer.Option("--rps", min=0.001, help="Planning rate, requests/s.")]
MaxLoadOpt = Annotated[float | None, typer.Option("--max-load", min=0.01, max=1.0, help="Load ceiling (default 0.7).")]
MaxRejectOpt = Annotated[float, typer.Option("--max-reject", min=0, max=1, help="Most share shed with 429s.")]
TierSloOpt = Annotated[str | None, typer.Option("--tier-slo", help="Per-tier P95 SLOs, e.g. enterprise=300.")]
OverallOnlyOpt = Annotated[bool, typer.Option("--overall-only", help="Check P95 overall only, not per tier.")]
MaxGpusOpt = Annotated[int | None, typer.Option("--max-gpus", min=1, help="Search limit (default 4x the arithmetic).")]
DEFAULT_PRECISION = 0.01  # P95 known to +-1%: finer than any SLO margin worth planning on
PrecisionOpt = Annotated[float | None, precision_option("0.01")]
JobsOpt = Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Simulations at once, in processes [cores].")]
SweepOpt = Annotated[bool, typer.Option("--sweep", help="Also plan 0.1x..2x the rate: the GPUs-vs-rps curve.")]
SweepRatesOpt = Annotated[str | None, typer.Option("--sweep-rates", help="Rates for --sweep, e.g. 1000,5000.")]


HwModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Plan on hardware you do not own: a model profile --list names (the hardware extra)."),
]
HwGpuOpt = Annotated[str | None, typer.Option("--gpu", help="With --model: GPUs to compare, e.g. h100_sxm,l40s.")]
HwTpOpt = Annotated[str, typer.Option("--tp", help="With --model: tensor-parallel degrees to compare, e.g. 1,2,4,8.")]
HwEngineOpt = Annotated[str, typer.Option("--engine", help="With --model: vllm, sglang or trtllm.")]
PricesOpt = Annotated[Path | None, typer.Option("--prices", help="With --model: USD per GPU-hour (TOML [prices]).")]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="With --model: plan the options as tasks on this Ray cluster.")
]

FromSweepOpt = Annotated[
    Path | None,
    typer.Option("--from-sweep", help="Plan from a loadtest --sweep JSON's measured knee instead of simulating."),
]


def capacity(
    rps: PlanRateOpt = None,
    slo_p95_ms: SloOpt = None,
    max_load: MaxLoadOpt = None,
    max_reject: MaxRejectOpt = 0.001,
    tier_slo: TierSloOpt = None,
    overall_only: OverallOnlyOpt = False,
    max_gpus: MaxGpusOpt = None,
    duration: DurationOpt = None,
    warmup: WarmupOpt = None,
    seed: SeedOpt = None,
    precision: PrecisionOpt = None,
    min_duration: MinDurationOpt = None,
    sample_gpus: SampleGpusOpt = None,
    jobs: JobsOpt = None,
    sweep: SweepOpt = False,
    sweep_rates: SweepRatesOpt = None,
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
    slo_ttft: TtftSloOpt = None,
    slo_itl: ItlSloOpt = None,
    slo_tpot: TpotSloOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonFlagOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
    from_sweep: FromSweepOpt = None,
    hw_model: HwModelOpt = None,
    hw_gpu: HwGpuOpt = None,
    hw_tp: HwTpOpt = "1",
    hw_engine: HwEngineOpt = "vllm",
    prices: PricesOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Find the smallest GPU count meeting every SLO, the load ceiling and the reject limit, by simulation."""
    slos = _slos(slo_p95_ms, slo_ttft, slo_itl, slo_tpot, max_reject, tier_slo, overall_only)
    scen = build_scenario(
        scenario=scenario, profile=profile, tier_mix=tier_mix, no_overlap=no_overlap, slos=slos, max_load=max_load,
        max_batch=max_batch, max_wait_ms=max_wait_ms, kernel_ms=kernel_ms, prefix_caching=prefix_caching,
        routing=routing, kv_policy=kv_policy,
    )  # fmt: skip
    if from_sweep is not None:
        return _finish(_from_sweep(from_sweep, rps, scen.model.max_load), json_out, save)
    tokens = token_load(
        prompt_tokens, output_tokens, dataset, tokenizer, stream, dataset_format, shared_prefix, sessions, think_time
    )
    workload = _rate_workload(scen, rps, tokens)
    settings = _settings(scen, duration, warmup, seed, precision, min_duration, sample_gpus)
    if hw_model is not None:
        search = _hardware_search(hw_model, hw_gpu, hw_tp, hw_engine, prices, ray_address)
        return _hardware(search, scen.model, slo_p95_ms, workload, settings, max_gpus, jobs, json_out, save, quiet)
    rates, modes = _sweep_rates(sweep, sweep_rates, workload.schedule.rps), _batching_modes(batching, scen.model)
    result = _search(scen.model, modes, workload, settings, max_gpus, rates, jobs, show=not (quiet or json_out))
    _finish(result, json_out, save)


def _slos(
    e2e: float | None, ttft: float | None, itl: float | None, tpot: float | None, max_reject: float,
    tier_slo: str | None, overall_only: bool,
) -> dict[str, Any]:  # fmt: skip
    """The objectives the flags set (unset ones are left to the scenario)."""
    return slo_flags(
        e2e_p95_ms=e2e, ttft_p95_ms=ttft, itl_p95_ms=itl, tpot_p95_ms=tpot, max_reject_rate=max_reject,
        **_tier_slos(tier_slo, overall_only),
    )  # fmt: skip


def _settings(
    scen: Any, duration: float | None, warmup: float | None, seed: int | None, precision: float | None,
    min_duration: float | None, sample_gpus: int | None,
) -> RunSettings:  # fmt: skip
    """The run settings a capacity search uses: P95s to 1% unless told otherwise."""
    return with_run_flags(
        scen.settings(duration_s=duration, warmup_s=warmup, seed=seed),
        DEFAULT_PRECISION if precision is None else precision, min_duration, sample_gpus,
    )  # fmt: skip


def _search(
    model: ServiceModel, modes: list[Batching], workload: Workload, settings: RunSettings, max_gpus: int | None,
    rates: list[float] | None, jobs: int | None, *, show: bool,
) -> CapacityResult:  # fmt: skip
    """The simulated search, with a progress line naming the GPU count being tried."""
    with status_progress("searching GPU count", enabled=show) as bar:
        return plan_batching_modes(
            model, modes, workload, settings, max_gpus=max_gpus, sweep_rates=rates,
            progress=lambda msg: bar.update(bar.task_ids[0], description=msg), jobs=jobs or os.cpu_count() or 1,
        )  # fmt: skip


def _hardware_search(
    model: str, gpus: str | None, tps: str, engine: str, prices: Path | None, ray_address: str | None
) -> Any:
    from ..calibrate.hardware_search import HardwareSearch, with_prices

    if not gpus:
        raise UsageError("--model plans on hardware: name the GPUs to compare with --gpu (infer-plan profile --list)")
    try:
        degrees = tuple(int(t) for t in tps.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--tp: comma-separated whole numbers expected, got {tps!r}") from None
    if not degrees or min(degrees) < 1:
        raise UsageError("--tp: every degree must be >= 1")
    names = tuple(g.strip() for g in gpus.split(",") if g.strip())
    search = HardwareSearch(model=model, gpus=names, tps=degrees, engine=engine, ray_address=ray_address)
    return with_prices(search, prices)


def _hardware(
    search: Any, model: ServiceModel, slo_p95_ms: float | None, workload: Workload, settings: RunSettings,
    max_replicas: int | None, jobs: int | None, json_out: bool, save: Path | None, quiet: bool,
) -> None:  # fmt: skip
    """Every (GPU, TP) planned and ranked; without --slo-p95-ms an LLM's end-to-end time is not held (its
    TTFT, ITL and TPOT objectives are what a streamed service promises)."""
    from ..calibrate.hardware_search import plan_hardware

    if slo_p95_ms is None:
        model = model.model_copy(update={"slos": model.slos.model_copy(update={"e2e_p95_ms": NOT_HELD_MS})})
    with status_progress("planning hardware options", enabled=not (quiet or json_out)) as bar:
        result = plan_hardware(
            search, model, workload, settings, max_replicas=max_replicas, jobs=jobs or os.cpu_count() or 1,
            progress=lambda msg: bar.update(bar.task_ids[0], description=msg),
        )  # fmt: skip
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_result(result)
    if result.best is None:
        raise typer.Exit(1)


def _from_sweep(path: Path, rps: float | None, max_load: float) -> CapacityResult:
    """The fleet for --rps from a measured sweep's knee (no simulation)."""
    from ..loadtests.sweep_plan import load_sweep, plan_from_sweep

    if rps is None:
        raise UsageError("--from-sweep plans for a rate: give --rps")
    return plan_from_sweep(load_sweep(path), rps, max_load)


def _rate_workload(scen: Any, rps: float | None, tokens: dict[str, Any]) -> Workload:
    """Capacity searches for a rate, so a replayed trace (its own timing) is refused here."""
    workload = scen.workload(rps=rps, **tokens)
    if workload.is_replay or workload.schedule.rps <= 0:
        raise UsageError("capacity plans for a rate: give --rps (a trace or timed dataset replays with 'simulate')")
    return workload


def _finish(result: CapacityResult, json_out: bool, save: Path | None) -> None:
    """Print or save the plan; exit 1 when no GPU count met every constraint."""
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_result(result)
    if result.gpus is None:
        raise typer.Exit(1)


def _batching_modes(text: str | None, model: ServiceModel) -> list[Batching]:
    """``static,continuous`` -> both, planned in turn; none given: the model's own."""
    if text is None:
        return [model.batching]
    try:
        return [Batching(m.strip()) for m in text.split(",") if m.strip()] or [model.batching]
    except ValueError:
        raise UsageError(f"--batching: expected static, continuous or both with a comma, got {text!r}") from None


def _sweep_rates(sweep: bool, text: str | None, rps: float) -> list[float] | None:
    if text is not None:
        return _parse_rates(text)
    return [rps * f for f in SWEEP_FACTORS] if sweep else None


def _tier_slos(text: str | None, overall_only: bool) -> dict[str, Any]:
    """``--tier-slo`` and ``--overall-only`` as the objectives they set (nothing when not given)."""
    return {"tier_e2e_p95_ms": _parse_tier_slo(text), "hold_tiers": False if overall_only else None}


def _parse_tier_slo(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    values = parse_tier_mix(text, flag="--tier-slo")
    for name, value in values.items():
        try:
            Tier.parse(name)
        except ValueError as err:
            raise UsageError(f"--tier-slo: {err}") from None
        if value <= 0:
            raise UsageError(f"--tier-slo: {name} must be > 0")
    return values
