"""Paged KV with preemption (SPEC section 13): blocks taken as a sequence grows, the lowest tier's latest arrival
preempted when none is free, and recomputed later; the engine held to its reference request by request."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import tomli_w
from infer_plan.core import ServiceModel
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.references.step_reference import simulate_steps_reference

from tests.helpers import run_cli
from tests.sim.test_prefix_caching import CONTEXT, OVERHEADS, PROFILE, TOKENS, shared_prefix_load, trace_load
from tests.sim.test_tokens import every_gap


def two_requests(tiers: tuple[int, int]) -> Arrivals:
    return Arrivals(
        times=np.array([0.0, 0.001]), tiers=np.array(tiers, np.int8), prompt_tokens=np.array([32, 32], np.int32),
        output_tokens=np.array([40, 40], np.int32),
    )  # fmt: skip


def test_where_reserve_queues_paged_preempts_and_both_match_the_reference():
    """Six blocks of 16 tokens; two requests of 32 + 40 tokens (five blocks each at their longest). Reserved whole,
    the second waits for the first to end. Paged, both start at once (three blocks each: the prompt and the next
    token); at the step that needs a fourth block for the first, none is free and the second, the latest
    arrival, is preempted, then recomputed (its prompt and the tokens it had) once the first has ended."""
    arr = two_requests((1, 1))
    out = {}
    for policy in ("reserve", "paged"):
        model = ServiceModel(batching="continuous", kv_cache_tokens=96, kv_block_tokens=16, kv_policy=policy, **TOKENS)
        fast = simulate_arrivals(model, arr, gpus=1)
        slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, 1)
        np.testing.assert_allclose(fast.records.first_token, slow.first_token, atol=1e-9)
        np.testing.assert_allclose(fast.records.finished, slow.finished, atol=1e-9)
        np.testing.assert_allclose(np.sort(every_gap(fast.itl)), np.sort(np.asarray(slow.gaps) * 1000), atol=1e-6)
        assert (fast.records.preemptions.tolist() if policy == "paged" else [0, 0]) == slow.preemptions.tolist()
        out[policy] = fast
    reserve, paged = out["reserve"].records, out["paged"].records
    assert reserve.first_token[1] > reserve.finished[0]  # queued behind the first for its whole answer
    assert paged.first_token[1] < 0.1 < paged.finished[0]  # started beside it
    assert paged.preemptions.tolist() == [0, 1]
    assert paged.finished[1] > paged.finished[0]  # recomputed after the first ended
    # the preempted one's tokens: some before the pause, one gap as long as the rest of the first's answer, the rest
    assert every_gap(out["paged"].itl).max() > 100


def test_the_lowest_tier_is_preempted_before_a_later_arrival_of_a_higher_one():
    model = ServiceModel(batching="continuous", kv_cache_tokens=96, kv_policy="paged", **TOKENS)
    rec = simulate_arrivals(model, two_requests((2, 0)), gpus=1).records  # free first, enterprise after
    assert rec.preemptions.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("gpus", "extra"),
    [
        (1, {}),
        (2, {"max_batched_tokens": 256}),  # chunked prefills preempted mid-prompt
        (2, CONTEXT),  # the recomputed context in the attention terms
        (1, {**OVERHEADS, "max_num_seqs": 12}),
    ],
)
def test_the_engine_matches_the_reference_request_by_request(gpus, extra):
    model = ServiceModel(batching="continuous", kv_policy="paged", kv_cache_tokens=1500 * gpus, **TOKENS, **extra)
    rng = np.random.default_rng(gpus + len(extra))
    arr = generate_arrivals(RateSchedule(rps=25 * gpus), 8.0, model.tier_shares, rng)
    n = len(arr)
    arr = Arrivals(arr.times, arr.tiers, rng.integers(20, 400, n).astype(np.int32),
                   rng.integers(1, 120, n).astype(np.int32))  # fmt: skip
    fast = simulate_arrivals(model, arr, gpus)
    slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, gpus)
    np.testing.assert_allclose(fast.records.first_token, slow.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.records.finished, slow.finished, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(np.sort(every_gap(fast.itl)), np.sort(np.asarray(slow.gaps) * 1000), atol=1e-6)
    assert fast.records.preemptions.tolist() == slow.preemptions.tolist()
    assert slow.preemptions.sum() > 10  # the case preempts


@pytest.mark.parametrize(
    ("gpus", "extra", "load"),
    [
        (1, {}, "shared"),
        (2, {"max_batched_tokens": 256, **CONTEXT}, "shared"),  # chunked prefills preempted mid-prompt
        (2, {"routing": "prefix_affinity"}, "trace"),
        (1, {**OVERHEADS, "max_num_seqs": 12}, "shared"),
    ],
)
def test_paged_kv_with_prefix_caching_matches_the_reference_request_by_request(gpus, extra, load):
    """Paged KV and prefix caching together (SPEC section 13): a sequence takes blocks as it grows, sharing its
    leading resident ones; a preempted one's full blocks stay cached, its answer's too, so when it is admitted
    again its recomputed context may find them. The engine equals its reference request by request: first token,
    finish, every gap, preemptions and cached tokens."""
    model = ServiceModel(batching="continuous", kv_policy="paged", prefix_caching=True, kv_cache_tokens=1800 * gpus,
                         **TOKENS, **extra)  # fmt: skip
    arr = (shared_prefix_load(25 * gpus, 8.0, gpus + len(extra), "256:6:zipf=1.1", model) if load == "shared"
           else trace_load(25 * gpus, 8.0, gpus, model))  # fmt: skip
    arr = Arrivals(arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens * 2, arr.prefixes)  # answers to grow
    fast = simulate_arrivals(model, arr, gpus)
    slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, gpus,
                                    prefixes=arr.prefixes)  # fmt: skip
    np.testing.assert_allclose(fast.records.first_token, slow.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.records.finished, slow.finished, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(np.sort(every_gap(fast.itl)), np.sort(np.asarray(slow.gaps) * 1000), atol=1e-6)
    assert fast.records.preemptions.tolist() == slow.preemptions.tolist()
    assert fast.records.cached_tokens.tolist() == slow.cached_tokens.tolist()
    assert slow.preemptions.sum() > 5 and slow.cached_tokens.sum() > 0  # the case preempts and hits
    print(f"\n{len(arr)} requests: {int(slow.preemptions.sum())} preemptions, "
          f"{slow.cached_tokens.sum() / arr.prompt_tokens.sum():.1%} of prompt tokens cached")  # fmt: skip


def test_simulate_reports_preemptions_per_tier(tmp_path):
    out = tmp_path / "sim.json"
    tables = tomllib.loads(PROFILE.read_text())
    tables["service"]["kv_cache_tokens"] = 40_000  # about thirty answers' worth: the decode steps run out
    profile = tmp_path / "small-kv.toml"
    profile.write_text(tomli_w.dumps(tables))
    done = run_cli(
        "simulate", "--profile", str(profile), "--gpus", "1", "--rps", "40", "--duration", "10", "--warmup", "2",
        "--prompt-tokens", "1000", "--output-tokens", "uniform:16,512", "--stream", "--kv-policy", "paged",
        "--json", "--save", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    per_tier = {tier: stats["preemptions"] for tier, stats in result["per_tier"].items()}
    assert result["preemptions"] == sum(per_tier.values()) > 0
    assert per_tier["free"] >= per_tier["enterprise"]  # the lowest tier goes first


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--kv-policy", "paged", "--batching", "static"], "is a feature of continuous batching"),
        (["--kv-policy", "lazy"], "'lazy' is not one of"),
    ],
)
def test_bad_kv_policies_are_one_line_and_exit_2(flags, needle):
    done = run_cli("simulate", "--profile", str(PROFILE), "--gpus", "1", "--rps", "5", "--duration", "2", *flags)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
