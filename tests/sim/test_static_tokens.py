"""The static batches' token times, settled many batches at once, against a step-by-step walk of each batch.

``StaticTokenBook`` computes first tokens, last tokens and every inter-token gap of many
batches with one pass of array operations (segmented sums, a difference table). Here each
batch is walked step by step in plain Python, straight from SPEC section 10: one prefill
step for all prompts after PCIe in and the kernel, then decode steps each holding the
sequences still generating. Mixed and uniform lengths, jitter, both answer modes, and
settling in one go or in parts must give the same times.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.sim.engines.static_tokens import StaticTokenBook

MODEL = ServiceModel(
    pcie_in_ms=5, kernel_ms=20, pcie_out_ms=5, decode_step_ms=8, prefill_ms_per_token=0.02, decode_ms_per_seq=0.3
)


def walk(model: ServiceModel, start: float, scale: float, prompt: np.ndarray, output: np.ndarray, tiers: np.ndarray):
    """One batch step by step: each request's first and last token, and every step's (gap, tiers held, end)."""
    n = output.size
    t = start + (model.pcie_in_ms + model.kernel_ms + model.per_item_ms * n) * scale
    t += (model.decode_step_ms + model.prefill_ms_per_token * prompt.sum() + model.decode_ms_per_seq * n) * scale
    first, last, steps = t, np.full(n, t), []
    for step in range(2, int(output.max()) + 1):
        alive = output >= step
        gap = (model.decode_step_ms + model.decode_ms_per_seq * alive.sum()) * scale
        t += gap
        last[alive] = t
        steps.append((gap * 1000, tuple(np.bincount(tiers[alive], minlength=3)), t))
    return first, last, t + model.pcie_out_ms * scale, steps


def batches(rng: np.random.Generator, rows: np.ndarray, count: int, uniform: bool, out: np.ndarray) -> list:
    """``count`` random batches over ``rows``, filling their output lengths: one length per batch, or mixed."""
    plan, at = [], float(rng.uniform(0, 10))
    for ids in np.array_split(rng.permutation(rows), count):
        out[ids] = rng.integers(1, 40) if uniform else rng.integers(1, 40, ids.size)
        at += rng.uniform(0.01, 0.5)
        plan.append((np.sort(ids), at, rng.uniform(0.8, 1.3) / 1000.0))  # rows, start, jitter (ms to s)
    return plan


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("lengths", ["mixed", "uniform", "both"])
def test_settled_times_and_gaps_are_the_step_by_step_walk(stream, lengths):
    rng = np.random.default_rng(7)
    rows = 600
    tiers = rng.integers(0, 3, rows).astype(np.int8)
    prompt, out = rng.integers(1, 300, rows), np.zeros(rows, np.int64)
    halves = np.arange(rows // 2), np.arange(rows // 2, rows)
    plan = batches(rng, halves[0], 20, lengths == "uniform", out)
    plan += batches(rng, halves[1], 20, lengths != "mixed", out)

    want_first, want_done, want_steps = np.full(rows, np.nan), np.full(rows, np.nan), []
    for ids, at, scale in plan:
        first, last, end, steps = walk(MODEL, at, scale, prompt[ids], out[ids], tiers[ids])
        want_first[ids], want_done[ids] = first + 0.002, (last if stream else end) + 0.002
        want_steps += steps
    want_steps.sort()

    settled = []
    for groups in ([plan], [plan[:7], plan[7:25], plan[25:]]):  # settled in one go, then in three settlements
        book = StaticTokenBook(MODEL, stream=stream, shared_queue_s=0.002)
        cols = SimpleNamespace(first_token=np.full(rows, np.nan), completion=np.full(rows, np.nan))
        for group in groups:
            for ids, at, scale in group:
                end = walk(MODEL, at, scale, prompt[ids], out[ids], tiers[ids])[2]
                book.book(ids, at, scale, int(prompt[ids].sum()), int(out[ids].sum()), int(out[ids].max()), end)
            book.settle(out, tiers, cols)
        gaps = book.take_gaps()
        np.testing.assert_allclose(cols.first_token, want_first, rtol=0, atol=1e-9)
        np.testing.assert_allclose(cols.completion, want_done, rtol=0, atol=1e-9)
        got = sorted(zip(gaps.gaps_ms.tolist(), map(tuple, gaps.counts.tolist()), gaps.at_s.tolist(), strict=True))
        assert [g[1] for g in got] == [w[1] for w in want_steps]  # every step, the tiers it held
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want_steps], rtol=1e-12)
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want_steps], rtol=0, atol=1e-9)
        settled.append(cols)
    assert np.array_equal(settled[0].completion, settled[1].completion)  # how batches were grouped changes nothing
    assert np.array_equal(settled[0].first_token, settled[1].first_token)
