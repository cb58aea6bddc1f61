"""One calibration, end to end: measure a backend (or read a server's traffic), fit, write the profile.

A size-only calibration varies the batch size and fits ``fixed + per_item x n``; given
prompt and output lengths, it measures every (size, prompt, output) cell and also fits
the three token coefficients of SPEC section 10.

:func:`run_calibration` is what ``infer-plan calibrate`` calls after parsing its flags;
it returns the typed result, with the profile written to ``spec.out``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InferPlanError, UsageError
from ..core.model import ServiceModel
from ..core.schema import CalibrationPoint, CalibrationResult
from ..server.backends.base import Backend, BackendError
from .measure import BatchTimings, TooFewSizesError, measure_batches, served_batch_timings
from .profile import Cell, profile_toml

__all__ = ["DEFAULT_SIZES", "CalibrationSpec", "calibration_cells", "run_calibration"]

DEFAULT_SIZES = (1, 2, 5, 10, 20, 50, 100)
DEFAULT_TOKEN_SIZES = (1, 8, 32)  # a token calibration measures sizes x prompts x outputs cells
DEFAULT_PROMPTS = (32, 256)
DEFAULT_OUTPUTS = (1, 16)


@dataclass(frozen=True)
class CalibrationSpec:
    """What to measure and where the profile goes.

    Synthetic batches against ``backend`` (built with ``backend_options``), or, with
    ``traffic_url``, the batches a running server served its clients in its last
    ``window_s`` seconds (nothing is run).
    """

    out: Path
    model: ServiceModel = field(default_factory=ServiceModel)
    backend: str = "sim"
    backend_options: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None  # recorded in the profile's evidence
    sizes: list[int] | None = None  # None: DEFAULT_SIZES (DEFAULT_TOKEN_SIZES with tokens) up to max_batch
    prompt_tokens: list[int] | None = None  # either set: a token calibration (the other one's default fills in)
    output_tokens: list[int] | None = None
    repetitions: int = 10
    warmup_batches: int = 2
    traffic_url: str | None = None
    window_s: float = 300.0


def calibration_cells(spec: CalibrationSpec) -> list[Cell]:
    """The cells to measure: sizes alone, or every size x prompt length x output length."""
    tokens = spec.prompt_tokens is not None or spec.output_tokens is not None
    defaults = DEFAULT_TOKEN_SIZES if tokens else DEFAULT_SIZES
    top = min(spec.model.max_batch, defaults[-1]) if tokens else spec.model.max_batch
    sizes = spec.sizes or sorted({s for s in defaults if s <= top} | {top})
    _at_least_two(sizes, "batch sizes", "sizes", "a batch's fixed cost from its per-request cost")
    if not tokens:
        return [Cell(s) for s in sizes]
    prompts, outputs = spec.prompt_tokens or list(DEFAULT_PROMPTS), spec.output_tokens or list(DEFAULT_OUTPUTS)
    _at_least_two(prompts, "prompt lengths", "prompt_tokens", "the prefill cost from the per-request cost")
    _at_least_two(outputs, "output lengths", "output_tokens", "the decode step from the fixed cost")
    return [Cell(n, p, o) for n in sizes for p in prompts for o in outputs]


def _at_least_two(values: list[int], what: str, name: str, why: str) -> None:
    if len(set(values)) < 2 or min(values) < 1:
        raise UsageError(f"needs at least two {what}, different and >= 1, to tell {why}", field=name)


def run_calibration(spec: CalibrationSpec, *, on_batch: Callable[[], None] | None = None) -> CalibrationResult:
    """Measure, fit the batch costs and their spread, write the profile, return the result."""
    if spec.traffic_url is not None:
        if spec.prompt_tokens or spec.output_tokens:
            raise UsageError("a server's batch log holds batch sizes only: calibrate tokens with synthetic batches")
        timings = asyncio.run(_served(spec.traffic_url, spec.window_s))
        repetitions, warmup = min(len(v) for v in timings.samples_ms.values()), 0
        source = f"{spec.backend} (traffic, last {spec.window_s:g} s)"
    else:
        cells = calibration_cells(spec)
        engine = Backend.create(spec.backend, spec.model, spec.backend_options)
        timings = asyncio.run(_measure(engine, cells, spec.repetitions, spec.warmup_batches, on_batch))
        repetitions, warmup, source = spec.repetitions, spec.warmup_batches, spec.backend
    fit, jitter = timings.fit()
    split, phase_medians = timings.phase_split(fit), timings.phase_medians()
    cells, fitted = timings.cells, fit.predict(timings.cells)
    points = [
        CalibrationPoint(
            batch_size=c.size, prompt_tokens=c.prompt_tokens, output_tokens=c.output_tokens,
            median_ms=med, p95_ms=p95, min_ms=min(timings.samples_ms[c]), fitted_ms=f,
        )
        for c, med, p95, f in zip(cells, timings.median_ms(), timings.p95_ms(), fitted, strict=True)
    ]  # fmt: skip
    result = CalibrationResult(
        backend=source,
        model=spec.model_name,
        repetitions=repetitions,
        warmup_batches=warmup,
        points=points,
        fixed_ms=fit.fixed_ms,
        per_item_ms=fit.per_item_ms,
        decode_step_ms=fit.decode_step_ms,
        prefill_ms_per_token=fit.prefill_ms_per_token,
        decode_ms_per_seq=fit.decode_ms_per_seq,
        max_relative_error=fit.max_relative_error,
        mean_relative_error=fit.mean_relative_error,
        cycle_jitter=jitter,
        profile_path=str(spec.out),
        phases=split._asdict() if split is not None else None,
    )
    lengths = {"prompt_tokens": [c.prompt_tokens for c in cells], "output_tokens": [c.output_tokens for c in cells]}
    evidence = {
        "backend": source,
        "model": spec.model_name or "",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "batch_sizes": [c.size for c in cells],
        **(lengths if fit.tokens else {}),
        "median_ms": [round(m, 3) for m in timings.median_ms()],
        "fitted_ms": [round(float(f), 3) for f in fitted],
        "max_relative_error": round(fit.max_relative_error, 4),
    }
    if phase_medians is not None:
        evidence["phase_median_ms"] = {p: [round(m, 4) for m in v] for p, v in phase_medians.items()}
    try:
        spec.out.write_text(profile_toml(fit, jitter, evidence, split), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {spec.out}: {err.strerror}", field="out") from None
    return result


async def _measure(
    engine: Backend, cells: list[Cell], repetitions: int, warmup: int, on_batch: Callable[[], None] | None
) -> BatchTimings:
    await engine.start()
    try:
        return await measure_batches(engine, cells, repetitions, warmup, on_batch=on_batch)
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
    finally:
        await engine.close()


async def _served(url: str, window_s: float) -> BatchTimings:
    try:
        return await served_batch_timings(url, window_s)
    except TooFewSizesError as err:
        hint = "widen the window, wait for varied load, or calibrate with synthetic batches"
        raise InferPlanError(f"calibration failed: {err}: {hint}") from None
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
