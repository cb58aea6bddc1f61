"""The token-level model (SPEC section 10) against its worked cases and against the step-by-step reference."""

from __future__ import annotations

import numpy as np
import pytest
from infer_plan.core import ServiceModel, Tier
from infer_plan.core.model import TokenShape
from infer_plan.core.records import Outcome
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.compiled_steps import compiled_applies
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.references.step_reference import simulate_steps_reference

# Coefficients of the step formula: 8 ms a step, 0.05 ms a sequence, 0.02 ms a prompt token.
TOKENS = {"decode_step_ms": 8.0, "decode_ms_per_seq": 0.05, "prefill_ms_per_token": 0.02}


def lone(prompt: int, output: int, at: float = 0.0, tier: Tier = Tier.PAID) -> Arrivals:
    one = np.ones(1)
    return Arrivals(
        times=one * at, tiers=np.array([tier], np.int8), prompt_tokens=(one * prompt).astype(np.int32),
        output_tokens=(one * output).astype(np.int32),
    )  # fmt: skip


def ms(x: float) -> float:
    return x / 1000.0


def every_gap(itl) -> np.ndarray:
    """The gaps between consecutive tokens, one entry per gap (the engines keep them grouped)."""
    return np.repeat(itl.gaps_ms, itl.counts.sum(axis=1))


@pytest.mark.parametrize("stream", [False, True])
def test_static_lone_request_is_the_worked_case(stream):
    model = ServiceModel(**TOKENS)
    p, o = 300, 20
    out = simulate_arrivals(model, lone(p, o), gpus=1, stream=stream)
    step1 = 8.0 + 0.02 * p + 0.05
    ttft = 40 + 5 + 100 + 0 + step1
    last = ttft + (o - 1) * (8.0 + 0.05)
    assert out.records.first_token[0] == pytest.approx(ms(ttft))
    assert out.records.finished[0] == pytest.approx(ms(last if stream else last + 5))
    assert every_gap(out.itl).tolist() == pytest.approx([8.05] * (o - 1))  # every later token one decode step on


def test_static_with_no_token_coefficients_is_todays_cycle():
    out = simulate_arrivals(ServiceModel(), lone(512, 128), gpus=1)
    assert out.records.finished[0] == pytest.approx(0.150)  # 40 + 5 + 100 + 5, whatever the lengths
    assert out.records.first_token[0] == pytest.approx(0.145)


def test_a_static_batch_answers_short_and_long_requests_together_unless_streamed():
    model = ServiceModel(**TOKENS)
    arrivals = Arrivals(
        times=np.array([0.0, 0.001]), tiers=np.array([1, 1], np.int8),
        prompt_tokens=np.array([10, 10], np.int32), output_tokens=np.array([1, 100], np.int32),
    )  # fmt: skip
    batch = simulate_arrivals(model, arrivals, gpus=1, stream=False).records
    assert batch.finished[0] == batch.finished[1]  # the 1-token request waits for the batch's longest
    streamed = simulate_arrivals(model, arrivals, gpus=1, stream=True).records
    assert streamed.finished[0] == streamed.first_token[0] < streamed.finished[1]


def test_continuous_lone_request_is_the_worked_case():
    model = ServiceModel(batching="continuous", **TOKENS)
    p, o = 300, 20
    out = simulate_arrivals(model, lone(p, o, at=2.5), gpus=1)
    ttft = 8.0 + 0.02 * p + 0.05
    assert out.records.first_token[0] == pytest.approx(2.5 + ms(ttft))
    assert out.records.finished[0] == pytest.approx(2.5 + ms(ttft + (o - 1) * 8.05))
    assert every_gap(out.itl).tolist() == pytest.approx([8.05] * (o - 1))


# The extended step model (SPEC section 12): decode attention per context token, prefill attention per chunk token
# squared and per chunk token x context before it. The worked case leaves the floor and the prefill step at 0.
CONTEXT = {"decode_ms_per_kv_token": 0.001, "prefill_ms_per_token_sq": 2e-5, "prefill_ms_per_context_token": 4e-5}


def test_continuous_lone_request_with_context_terms_is_the_worked_case():
    """TTFT = decode_step + prefill_per_token p + prefill-attention(p, 0) + per_seq; gap k adds per_kv_token (p + k)."""
    model = ServiceModel(batching="continuous", **TOKENS, **CONTEXT)
    p, o = 300, 20
    out = simulate_arrivals(model, lone(p, o, at=2.5), gpus=1)
    ttft = 8.0 + 0.02 * p + 2e-5 * p * p + 0.05
    gaps = [8.05 + 0.001 * (p + k) for k in range(1, o)]
    assert out.records.first_token[0] == pytest.approx(2.5 + ms(ttft))
    assert out.records.finished[0] == pytest.approx(2.5 + ms(ttft + sum(gaps)))
    assert every_gap(out.itl).tolist() == pytest.approx(gaps)


def test_chunked_prefill_attends_to_the_chunks_before_it_and_a_small_step_to_the_floor():
    """Chunks of 128, 128, 44: each pays its square and its tokens x the prompt prefilled before it; the floor
    joins the linear part as hypot, and a step that prefills pays prefill_step_ms inside it."""
    model = ServiceModel(batching="continuous", max_batched_tokens=128, step_floor_ms=9.0, prefill_step_ms=1.0,
                         **TOKENS, **CONTEXT)  # fmt: skip
    p, o = 300, 3
    out = simulate_arrivals(model, lone(p, o), gpus=1)
    chunks = [(128, 0), (128, 128), (44, 256)]
    ttft = sum(np.hypot(9.0, 8.0 + 1.0 + 0.02 * c + 0.05) + 2e-5 * c * c + 4e-5 * c * before for c, before in chunks)
    assert out.records.first_token[0] == pytest.approx(ms(ttft))
    assert every_gap(out.itl).tolist() == pytest.approx([np.hypot(9.0, 8.05) + 0.001 * (p + k) for k in (1, 2)])


def test_every_context_term_at_zero_is_the_three_term_formula_exactly():
    model = ServiceModel(batching="continuous", **TOKENS)
    zeros = model.model_copy(update=dict.fromkeys([*CONTEXT, "step_floor_ms", "prefill_step_ms"], 0.0))
    arr = tokens_of(generate_arrivals(RateSchedule(rps=80), 3.0, model.tier_shares, np.random.default_rng(2)), 200, 30)
    a, b = (simulate_arrivals(m, arr, gpus=1).records for m in (model, zeros))
    assert a.first_token.tolist() == b.first_token.tolist() and a.finished.tolist() == b.finished.tolist()
    assert model.step_ms(100, 7, 1, kv_tokens=5000, prefill_sq=10_000) == model.step_ms(100, 7, 1)


def test_context_terms_are_refused_for_static_batching():
    with pytest.raises(ValueError, match="terms of continuous batching"):
        ServiceModel(decode_ms_per_kv_token=0.001)


# Per-request engine overheads (SPEC section 12): 3 ms + 0.01 ms a prompt token before admission, 0.4 ms a token.
OVERHEADS = {"request_overhead_ms": 3.0, "tokenize_ms_per_token": 0.01, "output_token_ms": 0.4}


def test_continuous_lone_request_with_engine_overheads_is_the_worked_case():
    model = ServiceModel(batching="continuous", **TOKENS, **OVERHEADS)
    p, o = 300, 20
    out = simulate_arrivals(model, lone(p, o, at=2.5), gpus=1)
    ttft = 3.0 + 0.01 * p + (8.0 + 0.02 * p + 0.05) + 0.4
    assert out.records.first_token[0] == pytest.approx(2.5 + ms(ttft))
    assert out.records.finished[0] == pytest.approx(2.5 + ms(ttft + (o - 1) * (8.05 + 0.4)))
    assert every_gap(out.itl).tolist() == pytest.approx([8.45] * (o - 1))


def test_engine_overheads_cost_no_gpu_time():
    """Overheads delay each request but not the engine: saturated throughput is the step formula's, as without."""
    base = ServiceModel(batching="continuous", max_num_seqs=4, **TOKENS)
    arr = tokens_of(generate_arrivals(RateSchedule(rps=2000), 2.0, base.tier_shares, np.random.default_rng(1)), 50, 10)
    done = [
        np.nanmax(simulate_arrivals(m, arr, gpus=1).records.finished)
        for m in (base, base.model_copy(update={"request_overhead_ms": 5.0, "tokenize_ms_per_token": 0.01}))
    ]
    assert done[1] == pytest.approx(done[0], abs=0.0056)  # only the last request's own delay shifts the end


def test_admission_host_time_lengthens_the_admitting_step_only():
    """Worked case: a lone request's TTFT gains admit_ms once (its first chunk's step), its gaps nothing."""
    model = ServiceModel(batching="continuous", max_batched_tokens=128, admit_ms_per_request=2.5, **TOKENS)
    p, o = 300, 5
    out = simulate_arrivals(model, lone(p, o), gpus=1)
    ttft = sum(8.0 + 0.02 * c + 0.05 for c in (128, 128, 44)) + 2.5
    assert out.records.first_token[0] == pytest.approx(ms(ttft))
    assert every_gap(out.itl).tolist() == pytest.approx([8.05] * (o - 1))


def test_admission_host_time_costs_throughput():
    """Unlike the overheads, admission host time is engine time: saturated, each request costs it once more."""
    base = ServiceModel(batching="continuous", max_num_seqs=4, backpressure={"queue_limit": 1000}, **TOKENS)
    arr = tokens_of(generate_arrivals(RateSchedule(rps=2000), 0.1, base.tier_shares, np.random.default_rng(1)), 50, 10)
    ends = [
        np.nanmax(simulate_arrivals(m, arr, gpus=1).records.finished)
        for m in (base, base.model_copy(update={"admit_ms_per_request": 2.0}))
    ]
    assert ends[1] - ends[0] == pytest.approx(ms(2.0) * len(arr), rel=1e-6)


WAKE = {"idle_wake_ms": 3.0, "idle_after_ms": 20.0}

EXTENDED_OVERLOAD = {
    "max_num_seqs": 8, "backpressure": {"queue_limit": 30}, "step_floor_ms": 9.0, "prefill_step_ms": 1.0,
    **CONTEXT, **OVERHEADS,
}  # fmt: skip


@pytest.mark.parametrize(
    ("rps", "gpus", "extra"),
    [
        (20, 1, {}),
        (60, 2, {}),
        (40, 1, {"kv_cache_tokens": 3000}),  # KV binds: head-of-line blocking
        (40, 2, {"kv_cache_tokens": 1500, "max_num_seqs": 8}),  # on two GPUs: one taking the head frees the other
        (40, 1, {"max_num_seqs": 3, "max_batched_tokens": 200}),  # chunked prefill, few slots
        (200, 1, {"max_num_seqs": 8, "backpressure": {"queue_limit": 30}}),  # overload: the zones shed
        (60, 2, OVERHEADS),  # engine overheads: long prompts overtaken by short ones sent just after
        (200, 1, {"max_num_seqs": 8, "backpressure": {"queue_limit": 30}, **OVERHEADS}),
        (60, 1, {"admit_ms_per_request": 1.5, "max_batched_tokens": 256, **OVERHEADS}),  # host time per admission
        (60, 2, {"cycle_jitter": (0.7, 0.9, 1.0, 1.2, 2.5), **OVERHEADS}),  # a measured spread: each step its own
        (60, 2, {"max_batched_tokens": 256, **CONTEXT}),  # the extended model: steps grow with the context
        (200, 1, EXTENDED_OVERLOAD),  # overload under the extended model: floor, prefill step, attention
        (60, 2, {"cycle_jitter": (0.7, 0.9, 1.0, 1.2, 2.5), "admit_ms_per_request": 1.5, **CONTEXT}),
        (8, 2, {**WAKE, **OVERHEADS}),  # a light load: GPUs idle between requests, a step after 20 ms wakes them
        (8, 1, {"cycle_jitter": (0.7, 0.9, 1.0, 1.2, 2.5), **WAKE}),  # the wake is added after the step's spread
        (200, 1, {"max_num_seqs": 8, "backpressure": {"queue_limit": 30}, **WAKE}),  # busy: it never idles
    ],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_continuous_engine_matches_the_step_by_step_reference(rps, gpus, extra, compiled):
    model = ServiceModel(batching="continuous", **TOKENS, **extra)
    if compiled and not compiled_applies(model):
        pytest.skip("a measured step spread and the extended step terms run on the interpreted engine only")
    rng = np.random.default_rng(rps)
    arr = generate_arrivals(RateSchedule(rps=rps), 6.0, model.tier_shares, rng)
    arr = Arrivals(
        times=arr.times, tiers=arr.tiers, prompt_tokens=rng.integers(20, 600, len(arr)).astype(np.int32),
        output_tokens=rng.integers(1, 60, len(arr)).astype(np.int32),
    )  # fmt: skip
    fast = simulate_arrivals(model, arr, gpus, compiled=compiled)
    slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, gpus)
    admitted = fast.records.outcome != 2
    assert admitted.tolist() == slow.admitted.tolist()
    np.testing.assert_allclose(fast.records.first_token, slow.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.records.finished, slow.finished, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(np.sort(every_gap(fast.itl)), np.sort(np.asarray(slow.gaps) * 1000), atol=1e-6)
    if rps == 200:
        assert (~admitted).sum() > 10, "the overload case must shed"


def test_a_step_that_starts_an_idle_engine_pays_the_wake_and_one_soon_after_a_step_does_not():
    """The first request meets an engine idle since it started; the second comes 10 ms after the first's last
    step (under idle_after_ms), the third 100 ms after the second's (over it)."""
    model = ServiceModel(batching="continuous", **TOKENS, **WAKE)
    step = 8.0 + 0.02 * 100 + 0.05  # a lone 100-token prefill: the first token
    done_1 = ms(step + 3.0 + 2 * 8.05)  # woken, then two decode steps
    times = np.array([0.0, done_1 + 0.010, done_1 + 0.010 + ms(step + 2 * 8.05) + 0.100])
    arr = Arrivals(times=times, tiers=np.full(3, 1, np.int8), prompt_tokens=np.full(3, 100, np.int32),
                   output_tokens=np.full(3, 3, np.int32))  # fmt: skip
    for compiled in (False, True):
        rec = simulate_arrivals(model, arr, gpus=1, compiled=compiled).records
        ttft = (rec.first_token - rec.scheduled) * 1000.0
        assert ttft.tolist() == pytest.approx([step + 3.0, step, step + 3.0])
        assert rec.finished[0] == pytest.approx(done_1)
        # idle_after_ms = 0: any pause wakes, but a step that follows the last at once was never idle
        rec = simulate_arrivals(model.model_copy(update={"idle_after_ms": 0.0}), arr, gpus=1, compiled=compiled).records
        assert ((rec.first_token - rec.scheduled) * 1000.0).tolist() == pytest.approx([step + 3.0] * 3)
        assert rec.finished[0] == pytest.approx(done_1)


def test_a_kv_budget_for_exactly_k_sequences_never_runs_k_plus_one():
    k, p, o = 4, 100, 50
    model = ServiceModel(batching="continuous", kv_cache_tokens=k * (p + o), **TOKENS)
    arr = Arrivals(
        times=np.zeros(12), tiers=np.full(12, 1, np.int8), prompt_tokens=np.full(12, p, np.int32),
        output_tokens=np.full(12, o, np.int32),
    )  # fmt: skip
    rec = simulate_arrivals(model, arr, gpus=1).records
    events = sorted([(t, 1) for t in rec.first_token] + [(t, -1) for t in rec.finished])
    running = np.cumsum([d for _, d in events])
    assert running.max() == k


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks():
    model = ServiceModel(batching="continuous", max_batched_tokens=256, **TOKENS)
    out = simulate_arrivals(model, lone(1000, 3), gpus=1)
    chunks = [256, 256, 256, 232]
    ttft = sum(8.0 + 0.02 * c + 0.05 for c in chunks)  # the first token comes with the last chunk
    assert out.records.first_token[0] == pytest.approx(ms(ttft))


def test_saturated_continuous_throughput_matches_the_step_formula():
    model = ServiceModel(batching="continuous", max_num_seqs=64, backpressure={"queue_limit": 100_000}, **TOKENS)
    rng = np.random.default_rng(0)
    arr = generate_arrivals(RateSchedule(rps=400), 60.0, model.tier_shares, rng)  # far more than one GPU serves
    n = len(arr)
    arr = Arrivals(arr.times, arr.tiers, np.full(n, 1, np.int32), np.full(n, 200, np.int32))
    out = simulate_arrivals(model, arr, gpus=1)
    window = (out.records.finished > 10) & (out.records.finished < 50)
    tokens_per_s = 200 * window.sum() / 40.0
    bound = 64 / ms(8.0 + 0.05 * 64)  # a full step of 64 decoding sequences: 64 tokens
    assert tokens_per_s == pytest.approx(bound, rel=0.02)


def test_under_overload_enterprise_sees_the_shortest_ttft():
    model = ServiceModel(batching="continuous", max_num_seqs=16, **TOKENS)
    rng = np.random.default_rng(1)
    arr = generate_arrivals(RateSchedule(rps=160), 60.0, model.tier_shares, rng)
    n = len(arr)
    arr = Arrivals(arr.times, arr.tiers, np.full(n, 200, np.int32), np.full(n, 40, np.int32))
    rec = simulate_arrivals(model, arr, gpus=1).records
    ttft = (rec.first_token - rec.scheduled) * 1000
    p95 = {t: np.nanpercentile(ttft[(rec.tier == t) & rec.ok], 95) for t in Tier}
    assert p95[Tier.ENTERPRISE] < p95[Tier.PAID] < p95[Tier.FREE]


def test_a_request_longer_than_the_whole_kv_cache_is_refused_without_blocking_the_rest():
    model = ServiceModel(batching="continuous", kv_cache_tokens=500, **TOKENS)
    arr = Arrivals(
        times=np.array([0.0, 0.001, 0.002]), tiers=np.full(3, 1, np.int8),
        prompt_tokens=np.array([100, 900, 100], np.int32), output_tokens=np.array([10, 10, 10], np.int32),
    )  # fmt: skip
    rec = simulate_arrivals(model, arr, gpus=1).records
    assert rec.outcome.tolist() == [Outcome.OK, Outcome.CLIENT_ERROR, Outcome.OK]
    assert rec.finished[2] < 0.5  # served behind the first, not stuck behind the refused one


def tokens_of(arr: Arrivals, prompt: int, output: int) -> Arrivals:
    n = len(arr)
    return Arrivals(arr.times, arr.tiers, np.full(n, prompt, np.int32), np.full(n, output, np.int32))


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_zones_shed_free_before_paid_before_enterprise_in_both_modes(batching):
    model = ServiceModel(batching=batching, max_num_seqs=64, **TOKENS)
    one_gpu = model.per_gpu_rps(TokenShape(200, 40))
    arr = generate_arrivals(RateSchedule(rps=3 * one_gpu), 60.0, model.tier_shares, np.random.default_rng(2))
    rec = simulate_arrivals(model, tokens_of(arr, 200, 40), gpus=1).records
    shed = {t: (rec.outcome[rec.tier == t] == Outcome.REJECTED).mean() for t in Tier}
    assert shed[Tier.FREE] > 0.5 and shed[Tier.FREE] > shed[Tier.PAID] > shed[Tier.ENTERPRISE]
    assert ((rec.outcome == Outcome.OK) | (rec.outcome == Outcome.REJECTED)).all()  # nothing lost


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_a_spike_scales_out_after_the_cold_start_in_both_modes(batching):
    autoscale = {"enabled": True, "scale_up_after_s": 10.0, "tick_s": 2.0, "scale_down_after_s": 1000.0}
    model = ServiceModel(batching=batching, max_num_seqs=64, cold_start_s=30.0, autoscale=autoscale, **TOKENS)
    rate = 0.5 * model.per_gpu_rps(TokenShape(200, 40))
    schedule = RateSchedule(rps=rate, segments=[{"kind": "spike", "factor": 4.0, "at_s": 20.0, "duration_s": 120.0}])
    arr = generate_arrivals(schedule, 200.0, model.tier_shares, np.random.default_rng(3))
    out = simulate_arrivals(model, tokens_of(arr, 200, 40), gpus=1, horizon_s=200.0)
    ordered = [e for e in out.fleet.scale_events if e.action == "ordered"]
    serving = [e for e in out.fleet.scale_events if e.action == "serving"]
    assert ordered and ordered[0].t_s >= 20.0 + 10.0  # the load must stay high for scale_up_after_s
    assert serving[0].t_s == pytest.approx(ordered[0].t_s + 30.0)  # the cold start
    assert max(e.gpus_up for e in out.fleet.scale_events) >= 2


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_gpu_failures_answer_their_requests_with_errors_and_lose_none_in_both_modes(batching):
    model = ServiceModel(batching=batching, max_num_seqs=64, faults={"mtbf_s": 20.0, "mttr_s": 5.0}, **TOKENS)
    rate = 0.5 * 3 * model.per_gpu_rps(TokenShape(200, 40))
    arr = generate_arrivals(RateSchedule(rps=rate), 120.0, model.tier_shares, np.random.default_rng(4))
    rec = simulate_arrivals(model, tokens_of(arr, 200, 40), gpus=3, horizon_s=120.0).records
    failed = rec.outcome == Outcome.FAILED
    assert failed.sum() > 0 and (rec.outcome == Outcome.OK).mean() > 0.5
    assert not np.isnan(rec.finished[failed]).any()  # each failed request got its error, at the failure
    answered = np.isin(rec.outcome, [Outcome.OK, Outcome.FAILED, Outcome.REJECTED])
    assert answered[rec.scheduled < 100].all()  # every request before the run's tail has an outcome
