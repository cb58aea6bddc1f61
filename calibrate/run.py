"""One calibration, end to end: measure a backend (or read a server's traffic), fit, write the profile.

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
from .profile import profile_toml

__all__ = ["DEFAULT_SIZES", "CalibrationSpec", "batch_sizes", "run_calibration"]

DEFAULT_SIZES = (1, 2, 5, 10, 20, 50, 100)


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
    sizes: list[int] | None = None  # None: DEFAULT_SIZES up to max_batch
    repetitions: int = 10
    warmup_batches: int = 2
    traffic_url: str | None = None
    window_s: float = 300.0


def batch_sizes(requested: list[int] | None, max_batch: int) -> list[int]:
    if requested is None:
        return sorted({s for s in DEFAULT_SIZES if s <= max_batch} | {max_batch})
    if len(requested) < 2 or requested[0] < 1:
        raise UsageError("needs at least two batch sizes >= 1 to fit a line", field="sizes")
    return requested


def run_calibration(spec: CalibrationSpec, *, on_batch: Callable[[], None] | None = None) -> CalibrationResult:
    """Measure, fit ``fixed + per_item x n`` and its spread, write the profile, return the result."""
    if spec.traffic_url is not None:
        timings = asyncio.run(_served(spec.traffic_url, spec.window_s))
        repetitions, warmup = min(len(v) for v in timings.samples_ms.values()), 0
        source = f"{spec.backend} (traffic, last {spec.window_s:g} s)"
    else:
        sizes = batch_sizes(spec.sizes, spec.model.max_batch)
        engine = Backend.create(spec.backend, spec.model, spec.backend_options)
        timings = asyncio.run(_measure(engine, sizes, spec.repetitions, spec.warmup_batches, on_batch))
        repetitions, warmup, source = spec.repetitions, spec.warmup_batches, spec.backend
    fit, jitter = timings.fit()
    fitted = fit.predict(timings.sizes)
    points = [
        CalibrationPoint(batch_size=s, median_ms=med, p95_ms=p95, min_ms=min(timings.samples_ms[s]), fitted_ms=f)
        for s, med, p95, f in zip(timings.sizes, timings.median_ms(), timings.p95_ms(), fitted, strict=True)
    ]
    result = CalibrationResult(
        backend=source,
        model=spec.model_name,
        repetitions=repetitions,
        warmup_batches=warmup,
        points=points,
        fixed_ms=fit.fixed_ms,
        per_item_ms=fit.per_item_ms,
        max_relative_error=fit.max_relative_error,
        mean_relative_error=fit.mean_relative_error,
        cycle_jitter=jitter,
        profile_path=str(spec.out),
    )
    evidence = {
        "backend": source,
        "model": spec.model_name or "",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "batch_sizes": timings.sizes,
        "median_ms": [round(m, 3) for m in timings.median_ms()],
        "fitted_ms": [round(float(f), 3) for f in fitted],
        "max_relative_error": round(fit.max_relative_error, 4),
    }
    try:
        spec.out.write_text(profile_toml(fit, jitter, evidence), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {spec.out}: {err.strerror}", field="out") from None
    return result


async def _measure(
    engine: Backend, sizes: list[int], repetitions: int, warmup: int, on_batch: Callable[[], None] | None
) -> BatchTimings:
    await engine.start()
    try:
        return await measure_batches(engine, sizes, repetitions, warmup, on_batch=on_batch)
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
