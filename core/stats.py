"""The one summariser: percentiles, mean, max, CDF points, and the token figures every result and plot shows.

A load test holds every request's time (a raw sample); the simulator at a million
requests a second holds log histograms (:class:`~.histogram.LogHistogram`). Both are
a :class:`Sample` here, so a P95 is one computation wherever it appears: numpy's
linear interpolation between order statistics, over the raw values or over the
histogram's bucket centres (within 0.5% of the raw values'). The token summary
(:func:`token_stats`) is the same for both; which requests count toward goodput is
decided once, by :func:`infer_plan.core.slos.good_requests`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .histogram import weighted_percentiles
from .schema import CDF_POINTS, LatencyStats, TokenStats

__all__ = [
    "BURST_GAP_S", "RawSample", "Sample", "latency_stats", "own_tpot_ms", "relative_errors", "token_stats",
    "weighted_percentiles",
]  # fmt: skip

# Two tokens of one stream this close together were read at once: no engine steps at 10 kHz, so the client, or the
# engine's front end, fell behind (short of CPU) and the gap timed is that lag's, not a step.
BURST_GAP_S = 1e-4

_CDF = np.asarray(CDF_POINTS, dtype=float)
_AT = {"p50_ms": CDF_POINTS.index(50), "p95_ms": CDF_POINTS.index(95), "p99_ms": CDF_POINTS.index(99)}


class Sample(Protocol):
    """What a summary reads: a raw sample or a log histogram."""

    @property
    def count(self) -> int: ...

    @property
    def mean_ms(self) -> float: ...

    def percentiles(self, points: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RawSample:
    """Values in ms, each ``weights[i]`` times when given (inter-token gaps come as (gap, count) pairs).

    Values that are not finite are times that do not exist (a request the simulation shed
    has no finish): they are not part of the sample.
    """

    values: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        finite = np.isfinite(self.values)
        if not finite.all():
            object.__setattr__(self, "values", self.values[finite])
            if self.weights is not None:
                object.__setattr__(self, "weights", self.weights[finite])

    @property
    def count(self) -> int:
        return int(self.values.size if self.weights is None else self.weights.sum())

    @property
    def mean_ms(self) -> float:
        if self.weights is None:
            return float(self.values.mean())
        return float((self.values * self.weights).sum() / self.weights.sum())

    def percentiles(self, points: np.ndarray) -> np.ndarray:
        if self.weights is None:
            return np.percentile(self.values, points)
        return weighted_percentiles(self.values, self.weights, points)


def _sample(values: np.ndarray | Sample) -> Sample:
    return RawSample(values) if isinstance(values, np.ndarray) else values


def _fields(sample: Sample, prefix: str, *, cdf: bool) -> dict[str, object]:
    """``{prefix}p50_ms``, P95, P99 and ``{prefix}cdf_ms`` from one pass; nothing for an empty sample."""
    if sample.count == 0:
        return {}
    points = sample.percentiles(_CDF)
    fields: dict[str, object] = {f"{prefix}{key}": float(points[i]) for key, i in _AT.items()}
    return fields | {f"{prefix}cdf_ms": points.tolist() if cdf else []}


def latency_stats(values_ms: np.ndarray | Sample, *, cdf: bool = True) -> LatencyStats:
    """Summary of a sample in ms; every field None (and no CDF) for an empty sample."""
    sample = _sample(values_ms)
    fields = _fields(sample, "", cdf=cdf)
    if fields:
        fields |= {"max_ms": float(sample.percentiles(np.array([100.0]))[0]), "mean_ms": sample.mean_ms}
    return LatencyStats(**fields)


def relative_errors(measured: LatencyStats, simulated: LatencyStats) -> dict[str, float | None]:
    """|measured - simulated| / simulated for P50, P95 and P99 (None where either is missing or zero)."""
    errors: dict[str, float | None] = {}
    for key in _AT:
        m, s = getattr(measured, key), getattr(simulated, key)
        errors[key] = abs(m - s) / s if m is not None and s else None
    return errors


def token_stats(
    *,
    ttft_ms: np.ndarray | Sample | None,
    itl_ms: np.ndarray | Sample,
    tpot_ms: np.ndarray | Sample | None,
    output_tokens: int,
    good: int,
    duration_s: float,
    prompt_and_cached: tuple[int, int] | None = None,
    preemptions: int | None = None,
) -> TokenStats:
    """TTFT, ITL, TPOT, output tokens/s and goodput of one window's requests.

    ``ttft_ms`` None: the answers were not streamed, so there is no first token to time
    (no TTFT or TPOT figures). TPOT is ``(E2E - TTFT) / (output tokens - 1)`` of each
    request of more than one token; ``good`` the requests :func:`~.slos.good_requests` counts;
    ``prompt_and_cached`` their prompt tokens and those found in the prefix cache (caching on).
    """
    stats: dict[str, object] = {}
    if ttft_ms is not None:
        stats |= _fields(_sample(ttft_ms), "ttft_", cdf=True)
    stats |= _fields(_sample(itl_ms), "itl_", cdf=True)
    if tpot_ms is not None:
        tpot = _sample(tpot_ms)
        if tpot.count:
            stats["tpot_p50_ms"], stats["tpot_p95_ms"] = (float(x) for x in tpot.percentiles(np.array([50.0, 95.0])))
    if duration_s > 0:
        stats["output_tokens_per_s"] = output_tokens / duration_s
        stats["goodput_rps"] = good / duration_s
    if prompt_and_cached is not None and prompt_and_cached[0] > 0:
        stats["prefix_hit_rate"] = prompt_and_cached[1] / prompt_and_cached[0]
    stats["preemptions"] = preemptions
    return TokenStats(**stats)


def own_tpot_ms(e2e_ms: np.ndarray, ttft_ms: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """Each request's TPOT, ``(E2E - TTFT) / (tokens - 1)``; 0 for a request of one token (it has no gap)."""
    return np.where(output_tokens > 1, (e2e_ms - ttft_ms) / np.maximum(output_tokens - 1, 1), 0.0)
