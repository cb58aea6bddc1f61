"""One load test, end to end: plan the arrivals, start the target if asked, send, simulate, analyse.

:func:`run_loadtest` is what ``infer-plan loadtest`` calls after parsing its flags, and
what a program can call directly; it returns the typed result and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibrate.measure import served_batch_timings
from ..calibrate.profile import calibrated_model
from ..core.errors import ConfigError, UsageError
from ..core.model import ServiceModel
from ..core.records import RequestRecords
from ..core.schema import LoadTestResult
from ..core.tiers import Tier
from ..server.access.keys import KeyStore
from ..server.backends.base import BackendError
from ..sim.engines.engine import EngineOutput, simulate_arrivals
from ..sim.inputs.arrivals import Arrivals
from ..sim.results.sinks import RequestWriter
from .analysis import BatchLogRerun, RunFacts, analyse
from .apis import prompt_text
from .harness import run_plan, schedule_start
from .plan import LoadPlan
from .scrape import scraping
from .spec import LoadTestSpec
from .target import check_reachable, local_sim_server
from .token_analysis import TokenSides

__all__ = ["LoadTestSpec", "Measured", "measure_loadtest", "run_loadtest", "target_url"]

log = logging.getLogger("infer_plan.loadtests")

Progress = Callable[[float], None]  # seconds of the schedule sent so far


@dataclass(frozen=True)
class Measured:
    """A load test's result and the request records it was computed from (a sweep judges a step by both)."""

    result: LoadTestResult
    records: RequestRecords


def run_loadtest(spec: LoadTestSpec, *, progress: Progress | None = None) -> LoadTestResult:
    """Send the planned load, simulate the same arrivals, and gate the outcome."""
    return measure_loadtest(spec, progress=progress).result


def measure_loadtest(spec: LoadTestSpec, *, progress: Progress | None = None) -> Measured:
    """:func:`run_loadtest`, keeping the measured records beside the result."""
    horizon = spec.warmup_s + spec.duration_s
    arrivals = spec.workload.arrivals(spec.model, horizon, spec.seed)
    if len(arrivals) == 0:
        raise UsageError("the schedule produces no requests: raise the rate or the duration")
    keys = {int(t): spec.api_key for t in Tier} if spec.api_key else _keys_per_tier(spec.keys_file, arrivals)
    # Opened before the load: a path that cannot be written fails now, not after the run.
    writer = RequestWriter(spec.save_requests) if spec.save_requests is not None else None
    started = time.time()
    with target_url(spec) as url:
        check_reachable(url)
        plan = LoadPlan(
            url.rstrip("/"), arrivals, keys, spec.model_name, timeout_s=spec.model.request_timeout_s, api=spec.api,
            stream=spec.workload.stream, tokenizer=spec.workload.tokenizer if spec.api.has_tokens else None,
            until_s=horizon,
        )  # fmt: skip
        if plan.tokenizer is not None:
            prompt_text(0, 1, plan.tokenizer)  # loads it here: a bad name is one line now, not an error per request
        autoscale = spec.model.autoscale
        start_at = schedule_start(autoscale.tick_s if autoscale.enabled else None)  # scraped on the schedule's clock
        with scraping(spec.scrape_metrics_url, start_at) as scraped:
            sent = run_plan(plan, workers=spec.workers, on_tick=progress, start_at=start_at)
    measured, fleet = sent.records, spec.fleet
    if writer is not None:
        writer.fold(measured)
        writer.close()
    predicted = None
    if fleet is not None:
        served = _served_lengths(arrivals, measured) if spec.api.has_tokens else arrivals
        every = spec.model.autoscale.tick_s if spec.model.autoscale.enabled else None  # the GPUs over time
        predicted = simulate_arrivals(
            spec.model, served, fleet, stream=spec.workload.stream, sample_every_s=every, send_until_s=horizon,
            plan_rows=True,  # sessions: row by row beside the measured turns
        )  # fmt: skip
    simulated = predicted.records if predicted is not None else None
    rerun = None
    if spec.batch_log_url is not None and fleet is not None:
        rerun = _rerun_with_batch_log(spec.batch_log_url, time.time() - started + 1.0, spec.model, arrivals, fleet)
    facts = RunFacts(
        target=spec.target,
        url=url,
        gpus=fleet,
        rps=spec.workload.schedule.rps,
        duration_s=spec.duration_s,
        warmup_s=spec.warmup_s,
        workers=spec.workers,
        api=spec.api.value,
        stream=spec.workload.stream,
    )
    tokens = None
    if sent.tokens is not None:
        tokens = TokenSides(
            measured=measured,
            log=sent.tokens,
            stream=spec.workload.stream,
            slos=spec.model.slos,
            window=(spec.warmup_s, horizon),
            simulated=simulated,
            simulated_gaps=predicted.itl if predicted is not None else None,
            turn=plan.sessions.turn if plan.sessions is not None else None,
        )
    result = analyse(
        measured, simulated, facts, spec.model.slos, baseline=spec.baseline, locust=sent.locust, batch_log=rerun,
        tokens=tokens, server_metrics=scraped.result() if scraped else None, failures=sent.failures,
        simulated_fleet=_simulated_fleet(predicted) if spec.model.autoscale.enabled else None,
    )  # fmt: skip
    return Measured(result, measured)


def _simulated_fleet(predicted: EngineOutput | None) -> dict[str, list[float]] | None:
    """The simulated autoscaler's GPUs over time, to plot beside the GPUs the server reported."""
    series = predicted.fleet.timeseries if predicted is not None else None
    if not series:
        return None
    return {key: [float(v) for v in series[key]] for key in ("t_s", "gpus_up", "gpus_provisioning")}


def _served_lengths(arrivals: Arrivals, measured: RequestRecords) -> Arrivals:
    """The plan's lengths, replaced by what the target counted where it answered (its tokenizer is the truth)."""
    assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
    assert measured.prompt_tokens is not None and measured.output_tokens is not None
    answered = measured.ok & (measured.output_tokens > 0)
    prompt = np.where(answered & (measured.prompt_tokens > 0), measured.prompt_tokens, arrivals.prompt_tokens)
    output = np.where(answered, measured.output_tokens, arrivals.output_tokens)
    return arrivals.with_lengths(prompt, output, arrivals.prefixes)


@contextlib.contextmanager
def target_url(spec: LoadTestSpec) -> Iterator[str]:
    """The target's URL: a ``sim`` target is a reference server started for the run (and stopped after it)."""
    if spec.target != "sim":
        yield spec.target
        return
    assert spec.fleet is not None
    with local_sim_server(spec.model, spec.fleet, spec.keys_file) as url:
        yield url


def _keys_per_tier(path: Path | None, arrivals: Arrivals) -> dict[int, str]:
    """The first key of each tier in the keys file (or the development keys), read by the server's own rules."""
    keys = {int(tier): key for tier, key in KeyStore.load(path).first_key.items()}
    missing = [t.label for t in Tier if int(t) not in keys and np.any(arrivals.tiers == t)]
    if missing:
        raise ConfigError(f"{path}: no key for tier(s) {', '.join(missing)} in the mix")
    return keys


def _rerun_with_batch_log(
    internal_url: str, window_s: float, model: ServiceModel, arrivals: Arrivals, gpus: int
) -> BatchLogRerun | None:
    """The same arrivals simulated with the batch times the server logged during the run.

    A failure here costs only this check: the load test's own result is still written.
    """
    try:
        timings = asyncio.run(served_batch_timings(internal_url, window_s))
    except BackendError as err:
        log.warning("no batch-log check: %s", err)
        return None
    fit, jitter = timings.fit()
    out = simulate_arrivals(calibrated_model(model, fit, jitter), arrivals, gpus)
    return BatchLogRerun(
        batches=sum(len(v) for v in timings.samples_ms.values()),
        sizes=timings.sizes,
        fit=fit,
        simulated=out.records,
    )
