"""Inter-token gaps as the engines keep them: grouped, never one entry per token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TokenGaps"]


@dataclass(frozen=True)
class TokenGaps:
    """Every gap between two consecutive tokens of a request, grouped: ``counts[i, tier]`` gaps of ``gaps_ms[i]``.

    A decode step of n sequences gives each of them one gap of the step's length; a run
    of k such steps k gaps each. Percentiles over all gaps are weighted percentiles of
    these pairs (:func:`infer_plan.core.stats.weighted_percentiles`).
    """

    gaps_ms: np.ndarray  # float64
    counts: np.ndarray  # int64, shape (len(gaps_ms), 3): how many gaps of that length each tier had
    at_s: np.ndarray  # float64: when those gaps ended (for the warm-up window)
