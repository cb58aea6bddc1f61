"""The tokens of static batches, settled many batches at a time.

A static batch's first token, every request's last token and every inter-token gap
follow from the batch's lengths in closed form (SPEC section 10), but done one batch at
a time that closed form is a dozen small numpy calls, several times the dispatcher's
own cost per batch. Only the batch's end is needed at once (it frees the GPU); the rest
is read only when requests are handed to a sink or a GPU fails. So the engine books each
batch here (its rows, start, jitter and length totals) and :meth:`StaticTokenBook.settle`
computes the pending batches' token times together, with one pass of numpy calls over
all their requests.

The formulas are those of the batch-by-batch version; the segmented sums (sequences
per step, a sequence's decode time) are done on integers, so a result does not depend
on how batches were grouped into one settlement.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ...core.model import ServiceModel
from ...core.tiers import Tier
from ..results.token_gaps import TokenGaps

__all__ = ["StaticTokenBook"]

_N_TIERS = len(Tier)


class StaticTokenBook:
    """Static batches whose token times are not yet written; the gaps of those already settled."""

    def __init__(self, model: ServiceModel, *, stream: bool, shared_queue_s: float) -> None:
        self.model = model
        self.stream = stream
        self.shared_queue_s = shared_queue_s
        self._ids: list[np.ndarray] = []
        # Per batch: start, scale (jitter, ms to s), prompt and output totals, longest output, end.
        self._batches: list[tuple[float, float, int, int, int, float]] = []
        self.gaps: list[TokenGaps] = []

    def book(
        self, ids: np.ndarray, start: float, scale: float, prompt: int, output: int, longest: int, end: float
    ) -> None:
        """One batch: its rows and the figures its token times follow from."""
        self._ids.append(ids)
        self._batches.append((start, scale, prompt, output, longest, end))

    def settle(self, output_tokens: np.ndarray, tiers: np.ndarray, cols: SimpleNamespace) -> None:
        """Write first token and completion of every booked request; keep the batches' gaps.

        ``output_tokens`` and ``tiers`` are the waiting room's columns, which the booked
        ids index: settle before the waiting room drops rows.
        """
        if not self._ids:
            return
        m, q = self.model, self.shared_queue_s
        sizes = np.fromiter((ids.size for ids in self._ids), np.int64, len(self._ids))
        ids = np.concatenate(self._ids)
        start, scale, prompt, output_total, longest, end = np.array(self._batches).T  # integers exact in float64
        self._ids, self._batches = [], []
        longest = longest.astype(np.int64)

        # batch_hold_ms(n) - pcie_out + step_ms(prompt, n), term by term in the model's order.
        hold = m.pcie_in_ms + m.kernel_ms + m.pcie_out_ms + m.per_item_ms * sizes
        step = m.decode_step_ms + m.prefill_ms_per_token * prompt + m.decode_ms_per_seq * sizes
        first_s = start + (hold - m.pcie_out_ms + step) * scale
        first_of = np.repeat(first_s, sizes)
        cols.first_token[ids] = first_of + q
        output = output_tokens[ids].astype(np.int64)
        if self.stream:
            cols.completion[ids] = first_of + self._decode_ms(output, sizes) * np.repeat(scale, sizes) + q
        else:
            cols.completion[ids] = np.repeat(end, sizes) + q
        tiers_of = tiers[ids].astype(np.int64)
        uniform = output_total == longest * sizes  # every sequence of the batch runs to its last step
        steps = np.maximum(longest - 1, 0)
        self._book_uniform_gaps(tiers_of, sizes, steps, first_s, scale, uniform)
        if not uniform.all():
            mixed = np.repeat(~uniform, sizes)
            rest = ~uniform
            self._book_mixed_gaps(output[mixed], tiers_of[mixed], sizes[rest], steps[rest], first_s[rest], scale[rest])

    def _decode_ms(self, output: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Each streamed request's decode time: (o_i - 1) * decode_step + per_seq * sum_j (min(o_i, o_j) - 1).

        Decode step k (k >= 2) holds the sequences still generating, #{j: o_j >= k}, so
        request i's steps sum to sum_j min(o_i, o_j) sequence-steps. Per batch: sort by
        (batch, length), count the batch's lengths <= o_i, and read sum_j min(o_i, o_j)
        off a cumulative sum of the sorted lengths.
        """
        m = self.model
        batch_of = np.repeat(np.arange(sizes.size), sizes)
        width = int(output.max()) + 1
        key = batch_of * width + output
        ordered = np.sort(key)
        cum = np.concatenate(([0], np.cumsum(ordered % width)))
        first_row = np.repeat(_bases(sizes), sizes)
        upto = np.searchsorted(ordered, key, side="right")  # rows of this batch no longer than o_i, plus first_row
        n = sizes[batch_of]
        sum_min = cum[upto] - cum[first_row] + output * (n - (upto - first_row))
        return (output - 1) * m.decode_step_ms + m.decode_ms_per_seq * (sum_min - n)

    def _book_uniform_gaps(
        self, tiers: np.ndarray, sizes: np.ndarray, steps: np.ndarray, first_s: np.ndarray, scale: np.ndarray,
        uniform: np.ndarray,
    ) -> None:  # fmt: skip
        """Batches whose sequences all have one length: every step holds all of them, so the table is their
        tier counts repeated (the common case of fixed lengths, and an order of magnitude cheaper)."""
        batch_of = np.repeat(np.arange(sizes.size), sizes)
        counts = np.bincount(batch_of * _N_TIERS + tiers, minlength=sizes.size * _N_TIERS)
        keep = uniform & (steps > 0)
        steps = steps[keep]
        alive = np.repeat(counts.reshape(-1, _N_TIERS)[keep], steps, axis=0)
        held = np.repeat(sizes[keep], steps)
        step_of = self._step_in_batch(steps, _bases(steps))
        self._book_rows(alive, held, held * step_of, step_of, steps, first_s[keep], scale[keep])

    def _book_mixed_gaps(
        self, output: np.ndarray, tiers: np.ndarray, sizes: np.ndarray, steps: np.ndarray, first_s: np.ndarray,
        scale: np.ndarray,
    ) -> None:  # fmt: skip
        """Steps 2..longest of batches of mixed lengths: how many sequences of each tier each step holds.

        Each batch owns rows [base_b, base_b + longest_b - 1) of one table, row r being
        step r - base_b + 2. A sequence is alive from step 2 to step o_j: +1 at its
        batch's first row, -1 at row base_b + o_j - 1, then a running sum down the rows.
        """
        rows = int(steps.sum())
        if rows == 0:
            return
        base = _bases(steps)
        base_of = np.repeat(base, sizes)
        cells = (rows + 1) * _N_TIERS  # a one-token sequence adds and takes away at the same row: nothing
        delta = np.bincount(base_of * _N_TIERS + tiers, minlength=cells)
        delta -= np.bincount((base_of + np.maximum(output, 1) - 1) * _N_TIERS + tiers, minlength=cells)
        alive = np.cumsum(delta.reshape(rows + 1, _N_TIERS)[:rows], axis=0)
        held = sum(alive[:, t] for t in range(1, _N_TIERS)) + alive[:, 0]  # column by column: faster than axis=1
        held_so_far = np.cumsum(held)
        held_within = held_so_far - np.repeat(held_so_far[base] - held[base], steps)  # summed within the batch
        self._book_rows(alive, held, held_within, self._step_in_batch(steps, base), steps, first_s, scale)

    def _book_rows(
        self, alive: np.ndarray, held: np.ndarray, held_within: np.ndarray, step_of: np.ndarray, steps: np.ndarray,
        first_s: np.ndarray, scale: np.ndarray,
    ) -> None:  # fmt: skip
        """Each step's gap (the step formula over the sequences it holds) and its end: the batch's first token
        plus its steps so far, whose per-sequence part is summed on integers (``held_within``)."""
        m = self.model
        if held.size == 0:
            return
        scale_of_row = np.repeat(scale, steps)
        gaps_s = (m.decode_step_ms + m.decode_ms_per_seq * held) * scale_of_row
        ends = np.repeat(first_s, steps) + (step_of * m.decode_step_ms + m.decode_ms_per_seq * held_within) * (
            scale_of_row
        )
        self.gaps.append(TokenGaps(gaps_s * 1000.0, alive, ends))

    @staticmethod
    def _step_in_batch(steps: np.ndarray, base: np.ndarray) -> np.ndarray:
        """1, 2, ..., steps_b for each batch in turn (``base``: each batch's first row)."""
        return np.arange(1, int(steps.sum()) + 1) - np.repeat(base, steps)

    def take_gaps(self) -> TokenGaps:
        """The gaps settled since the last call."""
        gaps, self.gaps = self.gaps, []
        if not gaps:
            return TokenGaps(np.empty(0), np.empty((0, _N_TIERS), np.int64), np.empty(0))
        return TokenGaps(
            np.concatenate([g.gaps_ms for g in gaps]),
            np.concatenate([g.counts for g in gaps]),
            np.concatenate([g.at_s for g in gaps]),
        )


def _bases(counts: np.ndarray) -> np.ndarray:
    """Each group's first row in a table of ``counts`` rows per group."""
    base = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=base[1:])
    return base
