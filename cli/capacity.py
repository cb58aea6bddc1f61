"""``infer-plan capacity``: the smallest fleet that meets the SLO, with its arithmetic."""

from __future__ import annotations

from typing import Annotated

import typer

from ..core.errors import UsageError
from ..core.tiers import Tier
from ..sim.planner import Constraints, plan_capacity
from .options import (
    DurationOpt,
    JsonFlagOpt,
    KernelOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    NoOverlapOpt,
    ProfileOpt,
    QuietOpt,
    SaveOpt,
    ScenarioOpt,
    SeedOpt,
    SloOpt,
    TierMixOpt,
    WarmupOpt,
    build_scenario,
)
from .output import emit_json, render_result
from .parsing import parse_tier_mix
from .progress import status_progress

SWEEP_FACTORS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


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
MaxRejectOpt = Annotated[float, typer.Option("--max-reject", min=0, max=1, help="Most rejected+failed share allowed.")]
TierSloOpt = Annotated[str | None, typer.Option("--tier-slo", help="Per-tier P95 SLOs, e.g. enterprise=300.")]
OverallOnlyOpt = Annotated[bool, typer.Option("--overall-only", help="Check P95 overall only, not per tier.")]
MaxGpusOpt = Annotated[int | None, typer.Option("--max-gpus", min=1, help="Search limit (default 4x the arithmetic).")]
SweepOpt = Annotated[bool, typer.Option("--sweep", help="Also plan 0.1x..2x the rate: the GPUs-vs-rps curve.")]
SweepRatesOpt = Annotated[str | None, typer.Option("--sweep-rates", help="Rates for --sweep, e.g. 1000,5000.")]


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
    sweep: SweepOpt = False,
    sweep_rates: SweepRatesOpt = None,
    tier_mix: TierMixOpt = None,
    no_overlap: NoOverlapOpt = False,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonFlagOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Find the smallest GPU count meeting P95, load ceiling and reject limits, by simulation."""
    scen = build_scenario(
        scenario=scenario, profile=profile, tier_mix=tier_mix, no_overlap=no_overlap, slo_p95_ms=slo_p95_ms,
        max_load=max_load, max_batch=max_batch, max_wait_ms=max_wait_ms, kernel_ms=kernel_ms,
    )  # fmt: skip
    workload = scen.workload(rps=rps)
    if workload.trace is not None:
        raise UsageError("capacity plans for a rate; replay a trace with 'infer-plan simulate --trace'")
    if workload.schedule.rps <= 0:
        raise UsageError("give the planning rate with --rps (or [load] rps in the scenario)")
    constraints = Constraints(
        slo_p95_ms=scen.model.slo_p95_ms, max_load=scen.model.max_load, max_reject=max_reject,
        tier_slo_p95_ms=_parse_tier_slo(tier_slo), check_tiers=not overall_only,
    )  # fmt: skip
    rates = _sweep_rates(sweep, sweep_rates, workload.schedule.rps)
    settings = scen.settings(duration_s=duration, warmup_s=warmup, seed=seed)
    with status_progress("searching GPU count", enabled=not (quiet or json_out)) as bar:
        result = plan_capacity(
            scen.model, workload, settings, constraints, max_gpus=max_gpus, sweep_rates=rates,
            progress=lambda msg: bar.update(bar.task_ids[0], description=msg),
        )  # fmt: skip
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_result(result)
    if result.gpus is None:
        raise typer.Exit(1)


def _sweep_rates(sweep: bool, text: str | None, rps: float) -> list[float] | None:
    if text is not None:
        return _parse_rates(text)
    return [rps * f for f in SWEEP_FACTORS] if sweep else None


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
