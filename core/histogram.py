"""Log-bucket histograms: the percentiles of millions of latencies in a few kilobytes, merged by adding counts.

A simulation at a million requests a second cannot keep every request's latency, so
each one is counted in a bucket as it finishes. Bucket ``i`` holds values in
``[LOW_MS * RATIO**i, LOW_MS * RATIO**(i+1))`` and is read back as its geometric
centre, which lies within ``RELATIVE_ERROR`` (0.499%) of every value in it. Percentiles
then follow numpy's linear rule over those centres (:func:`~.stats.weighted_percentiles`),
so a histogram's P95 is within ``RELATIVE_ERROR`` of ``np.percentile`` of the raw values.
Mean and max are kept exactly beside the counts. Values below ``LOW_MS`` (1 us) read as
1 us; above ``HIGH_MS`` (about 28 hours) as that.

Why not HdrHistogram or DDSketch: their Python packages add values one call at a time,
which costs more than the simulation itself; numpy's ``bincount`` adds a whole batch
of answers in one call.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "HIGH_MS", "LOW_MS", "RATIO", "RELATIVE_ERROR", "LogHistogram", "row_percentiles", "weighted_percentiles",
]  # fmt: skip

RATIO = 1.01
LOW_MS = 1e-3
HIGH_MS = 1e8
RELATIVE_ERROR = math.sqrt(RATIO) - 1.0
_LOG_RATIO = math.log(RATIO)
N_BUCKETS = math.ceil(math.log(HIGH_MS / LOW_MS) / _LOG_RATIO) + 1
CENTRES_MS = LOW_MS * RATIO ** (np.arange(N_BUCKETS) + 0.5)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Percentiles of the sample in which ``values[i]`` appears ``weights[i]`` times, by numpy's linear rule.

    Equal to ``np.percentile(np.repeat(values, weights), points)`` without building the
    repeated sample: inter-token gaps come as (gap, count) pairs, millions of gaps in a
    few thousand pairs.
    """
    keep = weights > 0
    order = np.argsort(values[keep], kind="stable")
    v, cum = values[keep][order], np.cumsum(weights[keep][order])
    position = (cum[-1] - 1) * np.asarray(points, dtype=float) / 100.0
    low = np.floor(position)
    i_low = np.searchsorted(cum, low, side="right")
    i_high = np.minimum(np.searchsorted(cum, low + 1, side="right"), v.size - 1)
    return v[i_low] + (position - low) * (v[i_high] - v[i_low])


def buckets_of(values_ms: np.ndarray) -> np.ndarray:
    """The bucket index of each value (clipped into range)."""
    scaled = np.log(np.maximum(values_ms, LOW_MS) / LOW_MS) / _LOG_RATIO
    return np.minimum(scaled.astype(np.int64), N_BUCKETS - 1)


def row_percentiles(counts: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` percentile of each row of bucket counts (a histogram per row) in one pass; nan for empty rows."""
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    position = np.maximum(total - 1, 0) * q / 100.0
    low = np.floor(position)
    i_low = np.minimum((cum <= low[:, None]).sum(axis=1), N_BUCKETS - 1)
    i_high = np.minimum((cum <= low[:, None] + 1).sum(axis=1), N_BUCKETS - 1)
    value = CENTRES_MS[i_low] + (position - low) * (CENTRES_MS[i_high] - CENTRES_MS[i_low])
    return np.where(total > 0, value, np.nan)


class LogHistogram:
    """Counts per log bucket, plus the exact count, sum and max (see the module docstring)."""

    __slots__ = ("counts", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.total_ms = 0.0
        self.max_ms = -math.inf

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(self, values_ms: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Count ``values_ms`` (each ``weights[i]`` times when given)."""
        if values_ms.size == 0:
            return
        if weights is not None:
            keep = weights > 0
            values_ms, weights = values_ms[keep], weights[keep]
            if values_ms.size == 0:
                return
        self.counts += np.bincount(buckets_of(values_ms), weights=weights, minlength=N_BUCKETS).astype(np.int64)
        self.total_ms += float(values_ms.sum() if weights is None else (values_ms * weights).sum())
        self.max_ms = max(self.max_ms, float(values_ms.max()))

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentiles(self, points: np.ndarray) -> np.ndarray:
        """Percentiles (0-100) by numpy's linear rule over the bucket centres; 100 is the exact max."""
        values = weighted_percentiles(CENTRES_MS, self.counts, np.asarray(points, dtype=float))
        return np.where(np.asarray(points) >= 100.0, self.max_ms, np.minimum(values, self.max_ms))

    @property
    def mean_ms(self) -> float:
        n = self.count
        return self.total_ms / n if n else math.nan
