"""A token API's load test in figures: TTFT, ITL, TPOT, tokens/s and goodput, measured and simulated.

The measured side reads the records and the token log; the simulated side the same
arrivals run through the simulator with the lengths the answers reported. Both go
through the one token summary (:func:`infer_plan.core.stats.token_stats`) with the
same mask of requests, so a TTFT P95 means the same computation in both columns.
The simulator groups inter-token gaps by step, not by request, so its ITL counts every
gap that ended inside the window (per tier), measured ITL those of the counted requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.records import RequestRecords
from ..core.schema import TokenComparison, TokenStats, TurnFigures
from ..core.slos import Slos, good_requests
from ..core.stats import RawSample, own_tpot_ms, token_stats
from ..sim.results.token_gaps import TokenGaps
from .token_log import TokenLog

__all__ = ["TokenSides", "compare_tokens", "compare_turns"]

_COMPARED = ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms", "tpot_p50_ms",
             "tpot_p95_ms")  # fmt: skip


@dataclass(frozen=True)
class TokenSides:
    """Everything the token figures of one run are computed from."""

    measured: RequestRecords
    log: TokenLog
    stream: bool
    slos: Slos
    window: tuple[float, float]  # the measured window of the schedule, seconds
    simulated: RequestRecords | None = None
    simulated_gaps: TokenGaps | None = None
    turn: np.ndarray | None = None  # sessions: each row's turn number (1: a session's first)

    @property
    def duration_s(self) -> float:
        return self.window[1] - self.window[0]


def compare_tokens(sides: TokenSides, mask: np.ndarray, tier: int | None) -> TokenComparison:
    """The figures of the requests in ``mask`` (counted ones of one tier, or all: ``tier`` None)."""
    m = sides.measured
    assert m.first_token is not None and m.output_tokens is not None
    rows = np.flatnonzero(mask)
    gaps = sides.log.token_gaps(rows, m.tier, m.first_token)
    measured = _stats(m, mask, gaps, tier, sides)
    simulated, errors = None, {}
    if sides.simulated is not None:
        simulated = _stats(sides.simulated, mask, sides.simulated_gaps, tier, sides)
        errors = {key: _relative(getattr(measured, key), getattr(simulated, key)) for key in _COMPARED}
    return TokenComparison(measured=measured, simulated=simulated, relative_error=errors)


def compare_turns(sides: TokenSides, counted: np.ndarray) -> list[TurnFigures]:
    """TTFT and the prefix cache's share per turn number of the counted requests: a chat's later turns should
    find their history cached, which the overall figures average away."""
    if sides.turn is None:
        return []
    m, sim = sides.measured, sides.simulated
    assert m.prompt_tokens is not None
    figures = []
    for turn in np.unique(sides.turn[counted]).tolist():
        mask = counted & (sides.turn == turn)
        measured = _stats(m, mask, None, None, sides)
        simulated = _stats(sim, mask, None, None, sides) if sim is not None else TokenStats()
        figures.append(
            TurnFigures(
                turn=turn,
                requests=int(mask.sum()),
                prompt_tokens_mean=float(m.prompt_tokens[mask].mean()),
                ttft_p50_ms=measured.ttft_p50_ms,
                ttft_p95_ms=measured.ttft_p95_ms,
                simulated_ttft_p50_ms=simulated.ttft_p50_ms,
                simulated_ttft_p95_ms=simulated.ttft_p95_ms,
                prefix_hit_rate=measured.prefix_hit_rate,
                simulated_prefix_hit_rate=simulated.prefix_hit_rate,
            )
        )
    return figures


def _stats(
    r: RequestRecords, mask: np.ndarray, gaps: TokenGaps | None, tier: int | None, sides: TokenSides
) -> TokenStats:
    assert r.first_token is not None and r.output_tokens is not None
    mask = mask & r.ok  # a row the simulation shed or failed has no times there
    w0, w1 = sides.window
    if gaps is not None:
        inside = (gaps.at_s >= w0) & (gaps.at_s < w1)
        counts = gaps.counts[inside]
        gap_values, gap_counts = gaps.gaps_ms[inside], counts.sum(axis=1) if tier is None else counts[:, tier]
    else:
        gap_values, gap_counts = np.empty(0), np.empty(0, np.int64)
    e2e, output = r.latency_ms[mask], r.output_tokens[mask].astype(np.int64)
    ttft = (r.first_token[mask] - r.scheduled[mask]) * 1000.0 if sides.stream else None
    several = output > 1
    return token_stats(
        ttft_ms=ttft,
        itl_ms=RawSample(gap_values, gap_counts),
        tpot_ms=None if ttft is None else own_tpot_ms(e2e, ttft, output)[several],
        output_tokens=int(output.sum()),
        good=int(good_requests(sides.slos, e2e, ttft, output).sum()),
        duration_s=sides.duration_s,
        prompt_and_cached=_prompt_and_cached(r, mask),
    )


def _prompt_and_cached(r: RequestRecords, mask: np.ndarray) -> tuple[int, int] | None:
    """Prompt tokens and those the prefix cache held, of the requests whose answer said (or the simulator's)."""
    if r.cached_tokens is None or r.prompt_tokens is None:
        return None
    told = mask & (r.cached_tokens >= 0)
    if not told.any():
        return None
    return int(r.prompt_tokens[told].sum()), int(r.cached_tokens[told].sum())


def _relative(measured: float | None, simulated: float | None) -> float | None:
    return abs(measured - simulated) / simulated if measured is not None and simulated else None
