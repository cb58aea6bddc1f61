"""``infer-plan loadtest``: open-loop Locust load with SLO gates, beside the simulator's prediction."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..loadtests.analysis import BatchLogRerun, GateLimits, analyse
from ..reports.schema import LoadTestResult, load_result
from ..reports.terminal import render_loadtest
from ..server.backends.base import BackendError
from ..server.calibrate import served_batch_timings
from ..server.keys import KeyStore
from ..sim.arrivals import ArrivalProcess, Arrivals, generate_arrivals
from ..sim.engine import simulate_arrivals
from ..sim.errors import ConfigError, UsageError
from ..sim.params import ServiceModel, Tier
from ..sim.profile import calibrated_model
from ..sim.scenario import parse_spike
from .options import (
    KernelOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    ProfileOpt,
    QuietOpt,
    ScenarioOpt,
    SloOpt,
    TierMixOpt,
    build_scenario,
)
from .output import emit_json, terminal
from .progress import status_progress


def _keys_per_tier(path: Path | None) -> dict[int, str]:
    """The first key of each tier in the keys file (or the development keys), read by the server's own rules."""
    return {int(tier): key for tier, key in KeyStore.load(path).first_key.items()}


def loadtest(
    target: Annotated[str, typer.Option("--target", help="'sim' (start a sim-backend server) or a base URL.")],
    rps: Annotated[float, typer.Option("--rps", min=0.001, help="Target arrival rate, requests/s.")],
    duration: Annotated[float, typer.Option("--duration", min=0.1, help="Seconds of load.")],
    warmup: Annotated[float, typer.Option("--warmup", min=0, help="First seconds excluded from results.")] = 2.0,
    arrival: Annotated[ArrivalProcess, typer.Option("--arrival", help="poisson or constant.")] = ArrivalProcess.POISSON,
    spike: Annotated[list[str] | None, typer.Option("--spike", help="FACTOR:AT_S:DURATION_S")] = None,
    gpus: Annotated[
        int | None, typer.Option("--gpus", min=1, help="Fleet of the sim target (and the simulation).")
    ] = None,
    model_name: Annotated[str, typer.Option("--model", help="Model name sent in requests.")] = "sim",
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys file; one key per tier is used.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, max=64, help="Locust worker processes (0: local).")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    slo_p95_ms: SloOpt = None,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate", min=0, max=1)] = 0.001,
    max_reject_rate: Annotated[float, typer.Option("--max-reject-rate", min=0, max=1)] = 0.01,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Earlier loadtest JSON to compare P95s with.")
    ] = None,
    baseline_tolerance: Annotated[
        float, typer.Option("--baseline-tolerance", min=0, help="Allowed P95 growth.")
    ] = 0.10,
    tier_mix: TierMixOpt = None,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")] = None,
    quiet: QuietOpt = False,
    junit_file: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (one case per gate).")] = None,
    html_file: Annotated[Path | None, typer.Option("--html", help="Write the HTML report here.")] = None,
    batch_log: Annotated[
        str | None,
        typer.Option(
            "--batch-log",
            help="The target's internal URL: after the run, re-simulate with the batch times it logged during it.",
        ),
    ] = None,
) -> None:
    """Drive a server with open-loop Locust load and gate on P95, errors and rejects (exit 1 on a failed gate)."""
    from ..loadtests.harness import run_plan
    from ..loadtests.junit import write_junit
    from ..loadtests.plan import LoadPlan
    from ..loadtests.target import local_sim_server

    scen = build_scenario(
        scenario=scenario,
        profile=profile,
        tier_mix=tier_mix,
        gpus=gpus,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        kernel_ms=kernel_ms,
        slo_p95_ms=slo_p95_ms,
    )
    model = scen.model
    workload = scen.workload(rps=rps, arrival=arrival, extra_segments=tuple(parse_spike(s) for s in spike or ()))
    if target != "sim" and not target.startswith(("http://", "https://")):
        raise UsageError(f"--target must be 'sim' or an http(s) URL, got {target!r}")
    base = None
    if baseline is not None:
        loaded = load_result(baseline)
        if not isinstance(loaded, LoadTestResult):
            raise ConfigError(f"{baseline}: a loadtest result is needed as baseline, not {loaded.kind}")
        base = loaded
    fleet = model.gpus or (1 if target == "sim" else None)
    if batch_log is not None and (target == "sim" or not batch_log.startswith(("http://", "https://"))):
        raise UsageError("--batch-log takes the internal http(s) URL of the --target server you started")
    if batch_log is not None and fleet is None:
        raise UsageError("--batch-log re-runs the simulation, which needs the target's --gpus")
    horizon = warmup + duration
    arrivals = generate_arrivals(
        workload.schedule, horizon, model.tier_shares, np.random.default_rng(seed), workload.arrival
    )
    if len(arrivals) == 0:
        raise UsageError("the schedule produces no requests; raise --rps or --duration")
    key_map = _keys_per_tier(keys)
    missing = [t.label for t in Tier if int(t) not in key_map and np.any(arrivals.tiers == t)]
    if missing:
        raise ConfigError(f"{keys}: no key for tier(s) {', '.join(missing)} in the mix")

    def drive(url: str):
        plan = LoadPlan(
            url=url.rstrip("/"), arrivals=arrivals, keys=key_map, model=model_name, timeout_s=model.request_timeout_s
        )
        label = f"sending {len(arrivals):,} requests over {horizon:g} s"
        with status_progress(label, enabled=not quiet, total=horizon) as progress:
            task = progress.task_ids[0]
            return run_plan(plan, workers=workers, on_tick=lambda s: progress.update(task, completed=min(s, horizon)))

    started = time.time()
    if target == "sim":
        assert fleet is not None
        with local_sim_server(model, fleet, keys) as url:
            records, locust_stats = drive(url)
    else:
        url = target
        records, locust_stats = drive(url)

    simulated = rerun = None
    if fleet is not None:
        out = simulate_arrivals(model, arrivals, fleet)
        simulated = (out.completion - arrivals.times) * 1000.0
    if batch_log is not None:
        assert fleet is not None
        rerun = _rerun_with_batch_log(batch_log, time.time() - started + 1.0, model, arrivals, fleet)
    limits = GateLimits(
        slo_p95_ms=model.slo_p95_ms,
        max_error_rate=max_error_rate,
        max_reject_rate=max_reject_rate,
        baseline=base,
        baseline_tolerance=baseline_tolerance,
    )
    result = analyse(
        records,
        target=target,
        url=url,
        gpus=fleet,
        rps=rps,
        duration_s=duration,
        warmup_s=warmup,
        workers=workers,
        simulated_ms=simulated,
        limits=limits,
        locust=locust_stats,
        batch_log=rerun,
    )
    emit_json(result, print_it=False, path=json_file)
    if junit_file is not None:
        write_junit(result, junit_file)
    if html_file is not None:
        from ..reports.html import write_html

        write_html(result, html_file)
    render_loadtest(result, terminal())
    if not result.passed:
        raise typer.Exit(1)


def _rerun_with_batch_log(
    internal_url: str, window_s: float, model: ServiceModel, arrivals: Arrivals, gpus: int
) -> BatchLogRerun | None:
    """The same arrivals simulated with the batch times the server logged during the run.

    A failure here costs only this check: the load test's own result is still written.
    """
    try:
        timings = asyncio.run(served_batch_timings(internal_url, window_s))
    except BackendError as err:
        print(f"infer-plan loadtest: no batch-log check: {err}", file=sys.stderr)
        return None
    fit, jitter = timings.fit()
    out = simulate_arrivals(calibrated_model(model, fit, jitter), arrivals, gpus)
    return BatchLogRerun(
        batches=sum(len(v) for v in timings.samples_ms.values()),
        sizes=timings.sizes,
        fit=fit,
        simulated_ms=(out.completion - arrivals.times) * 1000.0,
    )
