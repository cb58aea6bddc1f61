"""Sessions (SPEC section 13): conversations whose turns wait for each other's answers, with and without the cache
keeping their history; the engine held to its reference request by request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.prompt_blocks import SessionHistory, SharedPrefix
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.references.step_reference import simulate_steps_reference

from tests.helpers import REPO, run_cli

TOKENS = {"decode_step_ms": 8.0, "decode_ms_per_seq": 0.05, "prefill_ms_per_token": 0.02}
CONTEXT = {"decode_ms_per_kv_token": 0.001, "prefill_ms_per_token_sq": 2e-5, "prefill_ms_per_context_token": 4e-5}
OVERHEADS = {"request_overhead_ms": 5.0, "tokenize_ms_per_token": 0.01, "output_token_ms": 0.2}
PROFILE = REPO / "examples" / "profiles" / "llama-3.1-8b-instruct-h100.toml"


def two_turns(think_s: float) -> Arrivals:
    """One session: a 256-token system prompt (16 blocks), a message of 96 and an answer of 32 (384 tokens: 24 blocks
    whole), then a message of 100 sent ``think_s`` after the answer ended."""
    history = np.empty(2, dtype=object)
    history[:] = [SessionHistory(0, SharedPrefix(0, 256))] * 2
    return Arrivals(
        times=np.array([0.5, np.nan]), tiers=np.ones(2, np.int8), prompt_tokens=np.array([352, 484], np.int32),
        output_tokens=np.array([32, 5], np.int32), prefixes=history, follows=np.array([-1, 0]),
        think_s=np.array([0.0, think_s]),
    )  # fmt: skip


def test_the_second_turn_of_a_session_prefills_only_its_new_message_on_an_idle_gpu():
    """Section 13's worked case: turn 2's TTFT is decode_step + prefill_per_token x u2 + per_seq (with the attention
    terms over the 384 cached tokens), and it is sent a think time after turn 1's last token."""
    model = ServiceModel(batching="continuous", prefix_caching=True, **TOKENS, **CONTEXT)
    rec = simulate_arrivals(model, two_turns(think_s=2.0), gpus=1).records
    assert rec.scheduled[1] == pytest.approx(rec.finished[0] + 2.0)
    ttft_ms = (rec.first_token - rec.scheduled) * 1000
    assert ttft_ms[1] == pytest.approx(8.0 + 0.02 * 100 + 0.05 + 2e-5 * 100**2 + 4e-5 * 100 * 384)
    assert rec.cached_tokens.tolist() == [0, 384]  # the system prompt was never cached before; then all history
    # Without the cache, the whole history is prefilled again.
    plain = simulate_arrivals(ServiceModel(batching="continuous", **TOKENS), two_turns(2.0), gpus=1).records
    assert (plain.first_token[1] - plain.scheduled[1]) * 1000 == pytest.approx(8.0 + 0.02 * 484 + 0.05)


def session_load(rps: float, seconds: float, seed: int, model: ServiceModel, **load: str) -> Arrivals:
    spec = {"prompt_tokens": "uniform:20,200", "output_tokens": "uniform:1,60", "sessions": "uniform:1,6",
            "think_time": "exponential:mean=0.3", **load}  # fmt: skip
    return Workload(schedule={"rps": rps}, **spec).arrivals(model, seconds, seed)


@pytest.mark.parametrize(
    ("rps", "gpus", "extra", "load"),
    [
        (8, 1, {"prefix_caching": True}, {"shared_prefix": "128:4"}),
        (12, 1, {"prefix_caching": True, "kv_cache_tokens": 4000, "max_num_seqs": 6, **CONTEXT}, {}),  # evictions
        (10, 2, {"prefix_caching": True, "routing": "prefix_affinity", **OVERHEADS}, {"shared_prefix": "64:3"}),
        (10, 1, {"max_batched_tokens": 128, **OVERHEADS}, {}),  # no cache: closed loop, chunked prefill
        (4, 1, {"max_num_seqs": 2, "backpressure": {"queue_limit": 6}}, {}),  # shed turns, whose sessions go on
    ],
)
def test_the_engine_matches_the_reference_request_by_request(rps, gpus, extra, load):
    model = ServiceModel(batching="continuous", **TOKENS, **extra)
    arr = session_load(rps, 6.0, rps, model, **load)
    assert arr.follows is not None and arr.think_s is not None and (arr.follows >= 0).sum() > len(arr) / 3
    fast = simulate_arrivals(model, arr, gpus, horizon_s=8.0).records
    slow = simulate_steps_reference(
        model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, gpus, prefixes=arr.prefixes,
        follows=arr.follows, think_s=arr.think_s, until_s=8.0,
    )  # fmt: skip
    sent = np.flatnonzero(np.isfinite(slow.sent))
    sent = sent[np.argsort(slow.sent[sent], kind="stable")]  # the engine's records: turns in the order sent
    np.testing.assert_allclose(fast.scheduled, slow.sent[sent], atol=1e-9)
    np.testing.assert_allclose(fast.first_token, slow.first_token[sent], atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.finished, slow.finished[sent], atol=1e-9, equal_nan=True)
    if model.prefix_caching:
        assert fast.cached_tokens.tolist() == slow.cached_tokens[sent].tolist()
        assert 0.1 < fast.cached_tokens.sum() / fast.prompt_tokens.sum() < 0.9  # hits, and misses: the case means it
    if model.backpressure.queue_limit:
        shed = np.flatnonzero(~slow.admitted)
        assert 0 < shed.size < len(sent) / 2
        after_shed = np.flatnonzero(np.isin(arr.follows, shed))
        assert np.isfinite(slow.sent[after_shed]).sum() > after_shed.size / 2  # their sessions went on


def test_a_session_stops_sending_at_the_horizon():
    model = ServiceModel(batching="continuous", **TOKENS)
    arr = session_load(10, 4.0, 1, model, sessions="8", think_time="1")
    cut = simulate_arrivals(model, arr, 1, horizon_s=4.0).records
    every = simulate_arrivals(model, arr, 1).records
    assert cut.scheduled.max() < 4.0 <= every.scheduled.max()
    assert len(every) == len(arr) > len(cut)


def simulate(*flags: str) -> dict:
    """Five-turn chats on the example profile (later flags win: ``--gpus``, ``--rps``)."""
    done = run_cli("simulate", "--profile", str(PROFILE), "--gpus", "1", "--rps", "4", "--duration", "30",
                   "--prompt-tokens", "1000", "--output-tokens", "100", "--sessions", "5", "--think-time",
                   "exponential:mean=1", *flags, "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_simulate_runs_sessions_and_the_cache_keeps_their_history():
    cached, plain = simulate("--prefix-caching"), simulate("--no-prefix-caching")
    assert cached["offered_rps"] == pytest.approx(20, rel=0.25)  # five turns a session
    assert "sessions of 5 turns" in cached["lengths"]
    # turn t (from 0) repeats t messages and answers of 1,100 tokens: all but about a block of each is cached
    assert cached["prefix_hit_rate"] > 0.6 and plain["prefix_hit_rate"] is None
    assert cached["ttft_p50_ms"] < 0.5 * plain["ttft_p50_ms"]


def test_a_session_finds_its_history_on_the_replica_routed_by_prefix():
    """Behind one shared queue a turn goes to whichever GPU is free first, mostly not the one with its history."""
    hit = {routing: simulate("--gpus", "4", "--rps", "8", "--prefix-caching", "--routing", routing)["prefix_hit_rate"]
           for routing in ("shared_queue", "prefix_affinity")}  # fmt: skip
    assert hit["prefix_affinity"] > 0.6 and hit["shared_queue"] < 0.5 * hit["prefix_affinity"], hit


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--think-time", "2", "--rps", "1", "--batching", "continuous"], "give --sessions"),
        (["--sessions", "3", "--rps", "1", "--batching", "static"], "needs continuous batching"),
        (["--sessions", "lots", "--rps", "1", "--batching", "continuous"], "'lots'"),
        (["--sessions", "3", "--think-time", "soon", "--rps", "1", "--batching", "continuous"], "--think-time"),
        (["--sessions", "3", "--think-time", "-1", "--rps", "1", "--batching", "continuous"], ">= 0"),
    ],
)
def test_bad_session_flags_are_one_line_and_exit_2(flags, needle):
    done = run_cli("simulate", "--gpus", "1", "--duration", "5", *flags)
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_scenarios_sessions_reach_the_load_test_which_needs_a_token_api_and_one_rate(tmp_path):
    scenario = tmp_path / "chat.toml"
    scenario.write_text('[service]\nbatching = "continuous"\n\n[load]\nrps = 2\nsessions = "3"\n')
    done = run_cli("loadtest", "--target", "sim", "--scenario", str(scenario), "--rps", "2", "--duration", "1")
    assert done.returncode == 2 and "--api chat or --api completions" in done.stderr, done.stderr
    swept = run_cli("loadtest", "--target", "sim", "--scenario", str(scenario), "--api", "chat", "--sweep")
    assert swept.returncode == 2 and "one rate at a time" in swept.stderr and "Traceback" not in swept.stderr
