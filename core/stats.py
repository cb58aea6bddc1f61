"""The one latency summary: percentiles, mean, max and the CDF points every result and plot shows.

The simulator's results, a load test's measured and simulated columns and every
renderer take their numbers from :func:`latency_stats`, so a P95 means the same
computation wherever it appears (numpy's linear interpolation between order
statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .histogram import weighted_percentiles
from .schema import CDF_POINTS, LatencyStats, TokenStats

__all__ = ["Slos", "latency_stats", "relative_errors", "token_stats", "weighted_percentiles"]

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


@dataclass(frozen=True)
class Slos:
    """The per-request thresholds goodput counts against (None: not set)."""

    e2e_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None


def token_stats(
    *,
    ttft_ms: np.ndarray | None,
    e2e_ms: np.ndarray,
    output_tokens: np.ndarray,
    gaps_ms: np.ndarray,
    gap_counts: np.ndarray,
    duration_s: float,
    slos: Slos,
) -> TokenStats:
    """TTFT, ITL, TPOT, output tokens/s and goodput of the requests given (completed ones, one window).

    TPOT is ``(E2E - TTFT) / (output tokens - 1)``, for requests of more than one token.
    Goodput counts the requests whose own TTFT, TPOT and E2E are each within the
    thresholds set (as DistServe and ``vllm bench serve`` define it), per second.
    ``ttft_ms`` None: the answers were not streamed, so there is no first token to time
    (no TTFT or TPOT figures, and goodput counts E2E alone).
    """
    stats: dict[str, object] = {}
    good = np.ones(e2e_ms.size, dtype=bool)
    if slos.e2e_ms is not None:
        good &= e2e_ms <= slos.e2e_ms
    if ttft_ms is not None:
        stats |= _first_token_stats(ttft_ms, e2e_ms, output_tokens)
        several = output_tokens > 1
        if slos.ttft_ms is not None:
            good &= ttft_ms <= slos.ttft_ms
        if slos.tpot_ms is not None:
            own_tpot = np.where(several, (e2e_ms - ttft_ms) / np.maximum(output_tokens - 1, 1), 0.0)
            good &= own_tpot <= slos.tpot_ms
    if gap_counts.sum() > 0:
        itl = weighted_percentiles(gaps_ms, gap_counts, _CDF)
        stats |= {f"itl_{k}": float(itl[i]) for k, i in _AT.items()} | {"itl_cdf_ms": itl.tolist()}
    if duration_s > 0:
        stats["output_tokens_per_s"] = float(output_tokens.sum() / duration_s)
        stats["goodput_rps"] = float(good.sum() / duration_s)
    return TokenStats(**stats)


def _first_token_stats(ttft_ms: np.ndarray, e2e_ms: np.ndarray, output_tokens: np.ndarray) -> dict[str, object]:
    stats: dict[str, object] = {}
    if ttft_ms.size:
        ttft = np.percentile(ttft_ms, _CDF)
        stats |= {f"ttft_{k}": float(ttft[i]) for k, i in _AT.items()} | {"ttft_cdf_ms": ttft.tolist()}
    several = output_tokens > 1
    tpot = (e2e_ms[several] - ttft_ms[several]) / (output_tokens[several] - 1)
    if tpot.size:
        stats["tpot_p50_ms"], stats["tpot_p95_ms"] = (float(x) for x in np.percentile(tpot, [50, 95]))
    return stats
