"""The one latency summary: percentiles, mean, max and the CDF points every result and plot shows.

The simulator's results, a load test's measured and simulated columns and every
renderer take their numbers from :func:`latency_stats`, so a P95 means the same
computation wherever it appears (numpy's linear interpolation between order
statistics).
"""

from __future__ import annotations

import numpy as np

from .schema import CDF_POINTS, LatencyStats

__all__ = ["latency_stats", "relative_errors"]

_CDF = np.asarray(CDF_POINTS, dtype=float)
_AT = {"p50_ms": CDF_POINTS.index(50), "p95_ms": CDF_POINTS.index(95), "p99_ms": CDF_POINTS.index(99)}


def latency_stats(values_ms: np.ndarray, *, cdf: bool = True) -> LatencyStats:
    """Summary of a sample in ms; every field None (and no CDF) for an empty sample.

    The percentiles come from the same single pass as the CDF points.
    """
    if values_ms.size == 0:
        return LatencyStats()
    points = np.percentile(values_ms, _CDF)
    return LatencyStats(
        **{key: float(points[i]) for key, i in _AT.items()},
        max_ms=float(points[-1]),
        mean_ms=float(values_ms.mean()),
        cdf_ms=points.tolist() if cdf else [],
    )


def relative_errors(measured: LatencyStats, simulated: LatencyStats) -> dict[str, float | None]:
    """|measured - simulated| / simulated for P50, P95 and P99 (None where either is missing or zero)."""
    errors: dict[str, float | None] = {}
    for key in _AT:
        m, s = getattr(measured, key), getattr(simulated, key)
        errors[key] = abs(m - s) / s if m is not None and s else None
    return errors
