"""Backpressure zones: which arriving requests are admitted, decided in bulk.

The rule is sequential: each arrival sees the queue depth left by the ones before it.
Below ``yellow`` everything is admitted; from ``yellow`` free is shed; from ``red`` paid
is shed too; from ``full`` everything is shed. Because depth only grows between two
dispatches, the rule splits into at most four phases, each one a cumulative sum over a
mask, so a burst of arrivals costs a few numpy calls instead of a Python loop.
The server applies the same zones request by request through :func:`zone_admits`.
"""

from __future__ import annotations

import numpy as np

from .tiers import Tier

__all__ = ["admit_burst", "zone_admits"]

# The lowest-priority tier each zone still admits (green, yellow, red); full admits none.
# Tier values are priorities, so "admitted" is simply "tier <= this".
_LOWEST_ADMITTED: tuple[int, ...] = (Tier.FREE, Tier.PAID, Tier.ENTERPRISE)


def zone_admits(tier: int, depth: int, thresholds: tuple[int, int, int]) -> bool:
    """Whether one request of ``tier`` is admitted at queue ``depth``."""
    for bound, lowest in zip(thresholds, _LOWEST_ADMITTED, strict=True):
        if depth < bound:
            return tier <= lowest
    return False


def admit_burst(tiers: np.ndarray, depth: int, thresholds: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """Admission mask for arrivals in order, starting at queue ``depth``; and the depth after.

    Equivalent to calling :func:`zone_admits` for each arrival and adding one to the
    depth for each admitted one.
    """
    n = tiers.size
    admitted = np.zeros(n, dtype=bool)
    start = 0
    for bound, lowest in zip(thresholds, _LOWEST_ADMITTED, strict=True):
        if start >= n:
            break
        if depth >= bound:
            continue
        rest = tiers[start:]
        eligible = rest <= lowest
        counts = np.cumsum(eligible)
        room = bound - depth
        if counts[-1] <= room:
            admitted[start:] = eligible
            return admitted, depth + int(counts[-1])
        last = int(np.searchsorted(counts, room))  # index of the arrival that fills the zone
        admitted[start : start + last + 1] = eligible[: last + 1]
        depth = bound
        start += last + 1
    return admitted, depth
