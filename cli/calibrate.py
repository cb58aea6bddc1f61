"""``infer-plan calibrate``: measure a backend's batch latency and write a profile for the simulator."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from ..reports.schema import CalibrationPoint, CalibrationResult
from ..reports.terminal import render_calibration
from ..server.backends.base import Backend, BackendError
from ..server.calibrate import BatchTimings, TooFewSizesError, measure_batches, served_batch_timings
from ..sim.errors import InferPlanError, UsageError
from ..sim.profile import profile_toml
from .options import (
    JsonFlagOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    QuietOpt,
    SaveOpt,
    ScenarioOpt,
    TemperatureOpt,
    build_scenario,
    engine_options,
)
from .output import emit_json, terminal
from .progress import status_progress

_DEFAULT_SIZES = (1, 2, 5, 10, 20, 50, 100)


def calibrate(
    out: Annotated[Path, typer.Option("--out", help="Profile TOML to write (for --profile).")],
    backend: Annotated[
        str, typer.Option("--backend", help="sim | vllm | openai | remote (a running server) | package.module:Class")
    ] = "sim",
    model: Annotated[str | None, typer.Option("--model", help="Model directory (vllm) or name (openai).")] = None,
    upstream: Annotated[
        str | None, typer.Option("--upstream", help="openai: base URL; remote: a server's internal URL.")
    ] = None,
    sizes: Annotated[
        str | None, typer.Option("--sizes", help="Batch sizes, e.g. 1,10,100 [1,2,5,10,20,50,100 up to max_batch].")
    ] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-n", min=1, max=1000, help="Batches per size.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, max=100, help="Discarded warm-up batches.")] = 2,
    from_traffic: Annotated[
        bool,
        typer.Option(
            "--from-traffic",
            help="remote only: fit the batches the server served its clients (no batches are run).",
        ),
    ] = False,
    window_s: Annotated[
        float, typer.Option("--window", min=1, help="--from-traffic: the last SECONDS of traffic.")
    ] = 300.0,
    max_tokens: MaxTokensOpt = 16,
    temperature: TemperatureOpt = 0.0,
    max_model_len: MaxModelLenOpt = 512,
    scenario: ScenarioOpt = None,
    json_out: JsonFlagOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure batch latency against batch size and write a profile that replaces the fixed kernel time."""
    service = build_scenario(scenario=scenario).model
    options = engine_options(backend, model, upstream, max_tokens, temperature, max_model_len)
    if from_traffic:
        if backend != "remote":
            raise UsageError("--from-traffic reads a running server's batch log: use --backend remote --upstream URL")
        timings = asyncio.run(_served(options["upstream"], window_s))
        repetitions, warmup = min(len(v) for v in timings.samples_ms.values()), 0
    else:
        batch_sizes = _parse_sizes(sizes, service.max_batch)
        engine = Backend.create(backend, model=service, **options)
        total = warmup + repetitions * len(batch_sizes)
        with status_progress(f"calibrating {backend}", enabled=not (quiet or json_out), total=total) as progress:
            timings = asyncio.run(
                _measure(engine, batch_sizes, repetitions, warmup, lambda: progress.advance(progress.task_ids[0]))
            )
    fit, jitter = timings.fit()
    fitted = fit.predict(timings.sizes)
    points = [
        CalibrationPoint(batch_size=s, median_ms=med, p95_ms=p95, min_ms=min(timings.samples_ms[s]), fitted_ms=f)
        for s, med, p95, f in zip(timings.sizes, timings.median_ms(), timings.p95_ms(), fitted, strict=True)
    ]
    result = CalibrationResult(
        backend=f"{backend} (traffic, last {window_s:g} s)" if from_traffic else backend,
        model=model,
        repetitions=repetitions,
        warmup=warmup,
        points=points,
        fixed_ms=fit.fixed_ms,
        per_item_ms=fit.per_item_ms,
        max_relative_error=fit.max_relative_error,
        mean_relative_error=fit.mean_relative_error,
        cycle_jitter=jitter,
        profile_path=str(out),
    )
    evidence = {
        "backend": result.backend,
        "model": model or "",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "batch_sizes": timings.sizes,
        "median_ms": [round(m, 3) for m in timings.median_ms()],
        "fitted_ms": [round(float(f), 3) for f in fitted],
        "max_relative_error": round(fit.max_relative_error, 4),
    }
    try:
        out.write_text(profile_toml(fit, jitter, evidence), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror}") from None
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_calibration(result, terminal())


async def _measure(engine: Backend, sizes: list[int], repetitions: int, warmup: int, tick):
    await engine.start()
    try:
        return await measure_batches(engine, sizes, repetitions, warmup, on_batch=tick)
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
    finally:
        await engine.close()


async def _served(upstream: str, window_s: float) -> BatchTimings:
    try:
        return await served_batch_timings(upstream, window_s)
    except TooFewSizesError as err:
        hint = "widen --window, wait for varied load, or calibrate with synthetic batches (without --from-traffic)"
        raise InferPlanError(f"calibration failed: {err}: {hint}") from None
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None


def _parse_sizes(text: str | None, max_batch: int) -> list[int]:
    if text is None:
        return sorted({s for s in _DEFAULT_SIZES if s <= max_batch} | {max_batch})
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise UsageError("--sizes needs at least two batch sizes >= 1 to fit a line")
    return sizes
