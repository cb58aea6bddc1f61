"""``infer-plan loadtest``: open-loop Locust load with SLO gates, beside the simulator's prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import ConfigError
from ..core.schema import LoadTestResult, load_result
from ..loadtests.analysis import GateLimits
from .options import (
    ArrivalOpt,
    KernelOpt,
    KeysOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    ProfileOpt,
    QuietOpt,
    ScenarioOpt,
    SeedOpt,
    SloOpt,
    SpikeOpt,
    TierMixOpt,
    build_scenario,
    parse_spike,
)
from .output import render_result, write_result_files
from .progress import status_progress

TargetOpt = Annotated[str, typer.Option("--target", help="'sim' (start a sim-backend server) or a base URL.")]
RpsOpt = Annotated[float, typer.Option("--rps", min=0.001, help="Target arrival rate, requests/s.")]
SecondsOpt = Annotated[float, typer.Option("--duration", min=0.1, help="Seconds of load.")]
WarmupOpt = Annotated[float, typer.Option("--warmup", min=0, help="First seconds excluded from results.")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", min=1, help="Fleet of the sim target (and the simulation).")]
ModelNameOpt = Annotated[str, typer.Option("--model", help="Model name sent in requests.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, max=64, help="Locust worker processes (0: local).")]
ErrorRateOpt = Annotated[float, typer.Option("--max-error-rate", min=0, max=1, help="Most errors allowed.")]
RejectRateOpt = Annotated[float, typer.Option("--max-reject-rate", min=0, max=1, help="Most 429s allowed.")]
BaselineOpt = Annotated[Path | None, typer.Option("--baseline", help="Earlier loadtest JSON to compare P95s with.")]
ToleranceOpt = Annotated[float, typer.Option("--baseline-tolerance", min=0, help="Allowed P95 growth.")]
JsonFileOpt = Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (one case per gate).")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the HTML report here.")]
BatchLogOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-log", help="The target's internal URL: after the run, re-simulate with the batch times it logged."
    ),
]


def loadtest(
    target: TargetOpt,
    rps: RpsOpt,
    duration: SecondsOpt,
    warmup: WarmupOpt = 2.0,
    arrival: ArrivalOpt = None,
    spike: SpikeOpt = None,
    gpus: GpusOpt = None,
    model_name: ModelNameOpt = "sim",
    keys: KeysOpt = None,
    workers: WorkersOpt = 0,
    seed: SeedOpt = None,
    slo_p95_ms: SloOpt = None,
    max_error_rate: ErrorRateOpt = 0.001,
    max_reject_rate: RejectRateOpt = 0.01,
    baseline: BaselineOpt = None,
    baseline_tolerance: ToleranceOpt = 0.10,
    tier_mix: TierMixOpt = None,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_file: JsonFileOpt = None,
    quiet: QuietOpt = False,
    junit_file: JunitOpt = None,
    html_file: HtmlOpt = None,
    batch_log: BatchLogOpt = None,
) -> None:
    """Drive a server with open-loop Locust load and gate on P95, errors and rejects (exit 1 on a failed gate)."""
    from ..loadtests.run import LoadTestSpec, run_loadtest  # imports Locust, which needs gevent's patching first

    scen = build_scenario(
        scenario=scenario, profile=profile, tier_mix=tier_mix, gpus=gpus, max_batch=max_batch,
        max_wait_ms=max_wait_ms, kernel_ms=kernel_ms, slo_p95_ms=slo_p95_ms,
    )  # fmt: skip
    limits = GateLimits(
        slo_p95_ms=scen.model.slo_p95_ms, max_error_rate=max_error_rate, max_reject_rate=max_reject_rate,
        baseline=_baseline(baseline), baseline_tolerance=baseline_tolerance,
    )  # fmt: skip
    workload = scen.workload(rps=rps, arrival=arrival, extra_segments=tuple(parse_spike(s) for s in spike or ()))
    spec = LoadTestSpec(
        target=target, model=scen.model, workload=workload, duration_s=duration, limits=limits, warmup_s=warmup,
        seed=seed or 0, gpus=scen.model.gpus, model_name=model_name, keys_file=keys, workers=workers,
        batch_log_url=batch_log,
    )  # fmt: skip
    horizon = warmup + duration
    with status_progress(f"load test over {horizon:g} s", enabled=not quiet, total=horizon) as bar:
        result = run_loadtest(spec, progress=lambda s: bar.update(bar.task_ids[0], completed=min(s, horizon)))
    write_result_files(result, json_file=json_file, junit_file=junit_file, html_file=html_file)
    render_result(result)
    if not result.passed:
        raise typer.Exit(1)


def _baseline(path: Path | None) -> LoadTestResult | None:
    if path is None:
        return None
    loaded = load_result(path)
    if not isinstance(loaded, LoadTestResult):
        raise ConfigError(f"{path}: a loadtest result is needed as baseline, not {loaded.kind}", field="baseline")
    return loaded
