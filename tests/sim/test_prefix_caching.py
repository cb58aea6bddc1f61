"""Prefix caching (SPEC section 13): worked cases, the engine against its reference, and the hit rate against an
independent LRU count."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.prompt_blocks import SharedPrefix, TraceHashes
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.inputs.shared_prefix import SharedPrefixSpec
from infer_plan.sim.references.step_reference import simulate_steps_reference

from tests.helpers import REPO, run_cli

TOKENS = {"decode_step_ms": 8.0, "decode_ms_per_seq": 0.05, "prefill_ms_per_token": 0.02}
CONTEXT = {"decode_ms_per_kv_token": 0.001, "prefill_ms_per_token_sq": 2e-5, "prefill_ms_per_context_token": 4e-5}
OVERHEADS = {"request_overhead_ms": 5.0, "tokenize_ms_per_token": 0.01, "output_token_ms": 0.2}
PROFILE = REPO / "examples" / "profiles" / "llama-3.1-8b-instruct-h100.toml"


def requests(times, prompts, outputs, prefixes, tier: int = 1) -> Arrivals:
    column = np.empty(len(prefixes), dtype=object)
    column[:] = prefixes
    return Arrivals(
        times=np.asarray(times, np.float64), tiers=np.full(len(times), tier, np.int8),
        prompt_tokens=np.asarray(prompts, np.int32), output_tokens=np.asarray(outputs, np.int32), prefixes=column,
    )  # fmt: skip


def test_a_cached_system_prompt_skips_its_prefill_on_an_idle_gpu():
    """Section 13's worked case with a shared system prompt: s = 512 tokens (32 blocks), own messages of 100."""
    model = ServiceModel(batching="continuous", prefix_caching=True, **TOKENS)
    system, other = SharedPrefix(0, 512), SharedPrefix(1, 512)
    arr = requests(
        times=[0.0, 1.0, 2.0, 3.0], prompts=[612, 612, 612, 512], outputs=[5, 5, 5, 5],
        prefixes=[system, system, other, system],
    )  # fmt: skip
    rec = simulate_arrivals(model, arr, gpus=1).records
    ttft_ms = (rec.first_token - arr.times) * 1000
    whole = 8.0 + 0.02 * 612 + 0.05
    assert ttft_ms.tolist() == pytest.approx([whole, 8.0 + 0.02 * 100 + 0.05, whole, 8.0 + 0.02 * 1 + 0.05])
    assert rec.cached_tokens.tolist() == [0, 512, 0, 511]  # a prompt cached whole still prefills its last token


def test_the_attention_terms_still_read_the_cached_context():
    model = ServiceModel(batching="continuous", prefix_caching=True, **TOKENS, **CONTEXT)
    system = SharedPrefix(0, 512)
    arr = requests(times=[0.0, 1.0], prompts=[612, 612], outputs=[3, 3], prefixes=[system, system])
    rec = simulate_arrivals(model, arr, gpus=1).records
    # the second prefills 100 tokens against the 512 cached before them: 100^2 and 100 x 512 in the attention terms
    second = 8.0 + 0.02 * 100 + 0.05 + 2e-5 * 100**2 + 4e-5 * 100 * 512
    assert (rec.first_token[1] - 1.0) * 1000 == pytest.approx(second)
    # its decode steps read the whole context, cached prefix included: 612 + 1, then 612 + 2 tokens
    gaps = (rec.finished[1] - rec.first_token[1]) * 1000
    assert gaps == pytest.approx(2 * (8.0 + 0.05) + 0.001 * (613 + 614))


def test_without_prefix_caching_nothing_is_cached_and_the_results_are_todays():
    system = SharedPrefix(0, 512)
    arr = requests(times=[0.0, 1.0], prompts=[612, 612], outputs=[5, 5], prefixes=[system, system])
    off = simulate_arrivals(ServiceModel(batching="continuous", **TOKENS), arr, gpus=1).records
    plain = simulate_arrivals(ServiceModel(batching="continuous", **TOKENS), requests(
        times=[0.0, 1.0], prompts=[612, 612], outputs=[5, 5], prefixes=[None, None]), gpus=1).records  # fmt: skip
    assert off.cached_tokens is None
    assert off.first_token.tolist() == plain.first_token.tolist()
    assert off.finished.tolist() == plain.finished.tolist()


def shared_prefix_load(rps: float, seconds: float, seed: int, spec: str, model: ServiceModel) -> Arrivals:
    rng = np.random.default_rng(seed)
    arr = generate_arrivals(RateSchedule(rps=rps), seconds, model.tier_shares, rng)
    shared = SharedPrefixSpec.parse(spec)
    prompts = rng.integers(20, 400, len(arr)) + shared.tokens
    return Arrivals(arr.times, arr.tiers, prompts.astype(np.int32), rng.integers(1, 60, len(arr)).astype(np.int32),
                    shared.draw(len(arr), rng))  # fmt: skip


def trace_load(rps: float, seconds: float, seed: int, model: ServiceModel) -> Arrivals:
    """Mooncake-like hash ids of 64-token blocks: conversations that grow a few blocks a turn."""
    rng = np.random.default_rng(seed)
    arr = generate_arrivals(RateSchedule(rps=rps), seconds, model.tier_shares, rng)
    chains, fresh, prefixes, prompts = [], 10_000, [], []
    for _ in range(len(arr)):
        if chains and rng.random() < 0.6:
            ids = [*chains[rng.integers(len(chains))], *range(fresh, fresh + 2)]
        else:
            ids = list(range(fresh, fresh + 3))
        fresh += 3
        chains.append(ids)
        prefixes.append(TraceHashes(tuple(ids), 64))
        prompts.append(64 * (len(ids) - 1) + int(rng.integers(1, 65)))
    column = np.empty(len(arr), dtype=object)
    column[:] = prefixes
    outputs = rng.integers(1, 40, len(arr)).astype(np.int32)
    return Arrivals(arr.times, arr.tiers, np.asarray(prompts, np.int32), outputs, column)


@pytest.mark.parametrize(
    ("rps", "gpus", "extra", "load"),
    [
        (60, 2, {}, "400:6:zipf=1.2"),
        (60, 1, {"kv_cache_tokens": 3000, "max_num_seqs": 4}, "400:6:zipf=1.2"),  # LRU evictions, queueing on KV
        (40, 1, {"kv_cache_tokens": 6000, "max_batched_tokens": 256, **OVERHEADS}, "256:20:zipf=1.1"),
        (60, 2, {"max_batched_tokens": 256, **CONTEXT}, "400:3"),
        (50, 1, {"kv_cache_tokens": 4000, "kv_block_tokens": 16, **CONTEXT}, "trace"),
        (50, 2, {"kv_block_tokens": 32}, "trace"),  # engine blocks of two trace blocks' halves
    ],
)
def test_the_engine_matches_the_reference_request_by_request(rps, gpus, extra, load):
    model = ServiceModel(batching="continuous", prefix_caching=True, **TOKENS, **extra)
    arr = trace_load(rps, 6.0, rps, model) if load == "trace" else shared_prefix_load(rps, 6.0, rps, load, model)
    fast = simulate_arrivals(model, arr, gpus).records
    slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, gpus,
                                    prefixes=arr.prefixes)  # fmt: skip
    np.testing.assert_allclose(fast.first_token, slow.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.finished, slow.finished, atol=1e-9, equal_nan=True)
    assert fast.cached_tokens.tolist() == slow.cached_tokens.tolist()
    assert 0.1 < fast.cached_tokens.sum() / arr.prompt_tokens.sum() < 0.95  # hits, and misses: the case means it


def test_the_hit_rate_of_a_zipf_workload_is_an_lru_count_over_the_same_blocks():
    """One sequence at a time on one GPU whose cache holds about seven of the twenty system prompts: the engine's
    cached tokens equal a plain least-recently-used count over the same block ids, exactly."""
    block, capacity = 16, 200
    model = ServiceModel(
        batching="continuous",
        prefix_caching=True,
        max_num_seqs=1,
        kv_cache_tokens=block * capacity,
        backpressure={"queue_limit": 1_000_000},
        **TOKENS,
    )  # fmt: skip  (nothing shed)
    arr = shared_prefix_load(2, 150.0, 7, "256:20:zipf=1.1", model)
    arr = Arrivals(arr.times, np.full(len(arr), 1, np.int8), arr.prompt_tokens, arr.output_tokens, arr.prefixes)
    served = simulate_arrivals(model, arr, gpus=1).records
    assert not np.isnan(served.first_token).any()
    engine = served.cached_tokens

    lru: OrderedDict = OrderedDict()
    expected = []
    for i, (prefix, prompt, output) in enumerate(
        zip(arr.prefixes, arr.prompt_tokens.tolist(), arr.output_tokens.tolist(), strict=True)
    ):  # served in arrival order: one tier, one sequence at a time
        shared = prefix.tokens // block
        ids = [("system", prefix.group, m) for m in range(shared)]
        ids += [("own", i, m) for m in range(shared, prompt // block)]
        hits = 0
        while hits < len(ids) and ids[hits] in lru:
            lru.pop(ids[hits])
            hits += 1
        while len(lru) > capacity - -(-(prompt + output) // block):
            lru.popitem(last=False)
        expected.append(min(hits * block, prompt - 1))
        answer = [("answer", i, m) for m in range(prompt // block, (prompt + output) // block)]
        for key in reversed(ids + answer):  # released when it ends: its answer's blocks, then its prompt's last first
            lru.pop(key, None)
            lru[key] = None
    assert engine.tolist() == expected
    assert 0.2 < sum(expected) / arr.prompt_tokens.sum() < 0.9  # the cache both hits and evicts here


def test_simulate_reports_the_hit_rate_per_tier_and_caching_shortens_ttft(tmp_path):
    def run(*flags: str) -> dict:
        out = tmp_path / "sim.json"
        done = run_cli(
            "simulate", "--profile", str(PROFILE), "--gpus", "1", "--rps", "30", "--duration", "20", "--warmup", "2",
            "--shared-prefix", "2000:8:zipf=1.1", "--prompt-tokens", "200", "--output-tokens", "64", "--stream",
            "--json", "--save", str(out), *flags,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(out.read_text())

    on, off = run("--prefix-caching"), run("--no-prefix-caching")
    assert "after one of 8 shared 2000-token system prompts" in on["lengths"]
    hit = on["prefix_hit_rate"]
    assert hit == pytest.approx(2000 / 2200)  # after the warm-up each finds its system prompt: the KV holds all 8
    assert {t: s["prefix_hit_rate"] is not None for t, s in on["per_tier"].items() if s["completed"]} == {
        t: True for t, s in on["per_tier"].items() if s["completed"]
    }
    assert off["prefix_hit_rate"] is None
    assert on["ttft_p95_ms"] < 0.5 * off["ttft_p95_ms"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--shared-prefix", "1000"], "--shared-prefix takes TOKENS:COUNT[:zipf=S]"),
        (["--shared-prefix", "1000:8:s=2"], "--shared-prefix takes TOKENS:COUNT[:zipf=S]"),
        (["--prefix-caching", "--batching", "static"], "prefix_caching is a feature of continuous batching"),
    ],
)
def test_bad_prefix_flags_are_one_line_and_exit_2(flags, needle):
    done = run_cli("simulate", "--profile", str(PROFILE), "--gpus", "1", "--rps", "5", "--duration", "2", *flags)
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_capacity_plans_for_the_cached_system_prompt():
    """README's case: 8 system prompts of 1,000 tokens before 200 of each request's own. Without caching every
    prompt's 1,200-token prefill stretches the decode steps it shares (ITL P95 binds); with it they prefill
    about 200, and the arithmetic and the load factor count the cached tokens as no work."""

    def plan(flag: str) -> dict:
        done = run_cli(
            "capacity", "--profile", str(PROFILE), "--rps", "200", "--shared-prefix", "1000:8:zipf=1.1",
            "--prompt-tokens", "200", "--output-tokens", "128", flag, "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    on, off = plan("--prefix-caching"), plan("--no-prefix-caching")
    assert on["gpus"] * 2 <= off["gpus"], (on["gpus"], off["gpus"])
    assert "992 cached" in " ".join(on["back_of_envelope"]["arithmetic"]) and "cached" not in str(
        off["back_of_envelope"]
    )
