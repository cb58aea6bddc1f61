"""The token facts of a load test that a record row cannot hold: every stream's gaps, and who counted.

A streamed request's inter-token gaps are many per row, so they are kept per request
here, and travel from a Locust worker to its master beside the record columns. For the
analysis they become the same grouped :class:`~infer_plan.sim.results.token_gaps.TokenGaps` the
simulator produces, so one percentile rule reads both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.stats import BURST_GAP_S
from ..core.tiers import Tier
from ..sim.results.token_gaps import TokenGaps
from .apis import CountedBy

__all__ = ["TokenLog"]


@dataclass
class TokenLog:
    counted_by: np.ndarray  # int8 CountedBy per row
    gaps_s: dict[int, np.ndarray] = field(default_factory=dict)  # row -> seconds between consecutive tokens

    @classmethod
    def empty(cls, n: int) -> TokenLog:
        return cls(counted_by=np.zeros(n, dtype=np.int8))

    def record(self, row: int, counted_by: CountedBy, token_times: list[float]) -> None:
        self.counted_by[row] = counted_by
        if len(token_times) > 1:
            self.gaps_s[row] = np.diff(np.asarray(token_times, dtype=np.float64))

    def message(self, indices: np.ndarray) -> dict[str, Any]:
        """This process's rows as raw bytes for a Locust message."""
        rows = [int(i) for i in indices if int(i) in self.gaps_s]
        gaps = [self.gaps_s[i] for i in rows]
        return {
            "counted_by": self.counted_by[indices].astype(np.int8).tobytes(),
            "gap_rows": np.asarray(rows, dtype=np.int64).tobytes(),
            "gap_lengths": np.asarray([g.size for g in gaps], dtype=np.int64).tobytes(),
            "gaps": (np.concatenate(gaps) if gaps else np.empty(0)).astype(np.float64).tobytes(),
        }

    def merge(self, indices: np.ndarray, data: dict[str, Any]) -> None:
        self.counted_by[indices] = np.frombuffer(data["counted_by"], dtype=np.int8)
        rows = np.frombuffer(data["gap_rows"], dtype=np.int64)
        lengths = np.frombuffer(data["gap_lengths"], dtype=np.int64)
        gaps = np.frombuffer(data["gaps"], dtype=np.float64)
        for row, part in zip(rows, np.split(gaps, np.cumsum(lengths)[:-1]), strict=True):
            self.gaps_s[int(row)] = part.copy()

    def token_gaps(self, rows: np.ndarray, tiers: np.ndarray, first_token: np.ndarray) -> TokenGaps:
        """The gaps of the given rows, one group per gap (``at_s``: when the gap ended, from schedule time 0)."""
        kept = [int(r) for r in rows if int(r) in self.gaps_s]
        if not kept:
            return TokenGaps(np.empty(0), np.empty((0, len(Tier)), np.int64), np.empty(0))
        gaps = [self.gaps_s[r] for r in kept]
        sizes = np.array([g.size for g in gaps])
        flat = np.concatenate(gaps)
        counts = np.zeros((flat.size, len(Tier)), dtype=np.int64)
        counts[np.arange(flat.size), np.repeat(tiers[kept].astype(np.int64), sizes)] = 1
        ends = np.concatenate([first_token[r] + np.cumsum(g) for r, g in zip(kept, gaps, strict=True)])
        return TokenGaps(flat * 1000.0, counts, ends)

    def burst_share(self, rows: np.ndarray) -> float | None:
        """The share of the rows' gaps under :data:`BURST_GAP_S` (None: no gaps): tokens the client read at once."""
        gaps = [self.gaps_s[r] for r in map(int, rows) if r in self.gaps_s]
        if not gaps:
            return None
        flat = np.concatenate(gaps)
        return float((flat < BURST_GAP_S).mean()) if flat.size else None

    def describe(self, rows: np.ndarray) -> str | None:
        """How the answered rows' token counts were found, for the report (None: none answered)."""
        by = self.counted_by[rows]
        usage, chunks = int((by == CountedBy.USAGE).sum()), int((by == CountedBy.CHUNKS).sum())
        if usage + chunks == 0:
            return None
        if chunks == 0:
            return "usage (the answers' own counts)"
        if usage == 0:
            return "chunks (content chunks counted: the answers carried no usage)"
        return f"usage for {usage:,} answers, chunks counted for {chunks:,}"
