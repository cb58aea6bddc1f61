"""Routing across replicas (SPEC section 13): each request waits in the queue of the replica chosen at its arrival.

The engine is held to its reference request by request under every rule; a worked case pins each rule's
choice; and on four replicas whose KV holds a quarter of the system prompts, prefix affinity keeps each
prompt where it is cached, where round robin makes every replica evict and prefill them again.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.model import Routing
from infer_plan.core.prompt_blocks import SharedPrefix
from infer_plan.core.records import Outcome
from infer_plan.core.routing import choose_replica
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.inputs.schedule import RateSchedule
from infer_plan.sim.inputs.shared_prefix import SharedPrefixSpec
from infer_plan.sim.references.step_reference import simulate_steps_reference

from tests.helpers import run_cli
from tests.sim.test_prefix_caching import CONTEXT, PROFILE, TOKENS, requests, shared_prefix_load

ROUTED = [r for r in Routing if r is not Routing.SHARED_QUEUE]


@pytest.mark.parametrize("routing", ROUTED)
@pytest.mark.parametrize(
    ("caching", "extra"),
    [
        (True, {"max_num_seqs": 8}),  # queues of their own: replicas with no slot free
        (True, {"kv_cache_tokens": 4000, **CONTEXT}),  # LRU evictions decide where the prefixes are
        (False, {"max_num_seqs": 6}),
    ],
)
def test_the_engine_matches_the_reference_request_by_request(routing, caching, extra):
    model = ServiceModel(batching="continuous", prefix_caching=caching, routing=routing, **TOKENS, **extra)
    arr = shared_prefix_load(120, 6.0, 7, "400:6:zipf=1.2", model)
    fast = simulate_arrivals(model, arr, 4).records
    slow = simulate_steps_reference(model, arr.times, arr.tiers, arr.prompt_tokens, arr.output_tokens, 4,
                                    prefixes=arr.prefixes)  # fmt: skip
    np.testing.assert_allclose(fast.first_token, slow.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(fast.finished, slow.finished, atol=1e-9, equal_nan=True)
    if caching:
        assert fast.cached_tokens.tolist() == slow.cached_tokens.tolist()
    shared = simulate_arrivals(model.model_copy(update={"routing": Routing.SHARED_QUEUE}), arr, 4).records
    assert not np.allclose(fast.first_token, shared.first_token, equal_nan=True)  # the rule changes who serves


def test_each_rule_chooses_as_section_13_says():
    loads, free = [3, 1, 1, 5], [True, True, True, False]
    assert [choose_replica(Routing.ROUND_ROBIN, loads, free, None, t) for t in range(5)] == [0, 1, 2, 3, 0]
    assert choose_replica(Routing.LEAST_LOADED, loads, free, None, 0) == 1  # fewest; the lower index on a tie
    # the longest cached prefix among replicas that would start it now; a busier one holding it is fine...
    assert choose_replica(Routing.PREFIX_AFFINITY, loads, free, [4, 0, 2, 9], 0) == 0
    assert choose_replica(Routing.PREFIX_AFFINITY, loads, free, [0, 2, 2, 0], 0) == 1  # a tie: the lighter, then
    assert choose_replica(Routing.PREFIX_AFFINITY, loads, free, [0, 2, 2, 0], 2) == 2  # the next in turn
    assert choose_replica(Routing.PREFIX_AFFINITY, [0] * 4, [True] * 4, [0] * 4, 7) == 3  # a new prompt: in turn
    # ...but none where it would wait while another would not; when all would wait, the least loaded
    assert choose_replica(Routing.PREFIX_AFFINITY, [3, 6, 4, 5], [False] * 4, [0, 0, 0, 9], 0) == 0


def test_round_robin_and_affinity_on_an_idle_fleet():
    """Two system prompts taking turns, three replicas, one request a second (each runs alone): round robin
    sends each prompt to a replica that last saw the other one (a, b, a on 0, 1, 2; then b on 0 and a on 1), so
    every one is prefilled whole; affinity sends each where its prompt is cached."""
    a, b = SharedPrefix(0, 512), SharedPrefix(1, 512)
    arr = requests(times=[0.0, 1.0, 2.0, 3.0, 4.0], prompts=[612] * 5, outputs=[3] * 5, prefixes=[a, b, a, b, a])
    whole, cached = 8.0 + 0.02 * 612 + 0.05, 8.0 + 0.02 * 100 + 0.05

    def ttft_ms(routing: str) -> list[float]:
        model = ServiceModel(batching="continuous", prefix_caching=True, routing=routing, **TOKENS)
        rec = simulate_arrivals(model, arr, gpus=3).records
        return ((rec.first_token - arr.times) * 1000).tolist()

    assert ttft_ms("round_robin") == pytest.approx([whole] * 5)
    assert ttft_ms("prefix_affinity") == pytest.approx([whole, whole, cached, cached, cached])  # a on 0, b on 1


def test_prefix_affinity_beats_round_robin_on_four_replicas():
    """32 system prompts of 2,000 tokens at 60 req/s on four replicas whose KV (30,000 tokens) holds a quarter of
    them: round robin sends every prompt to every replica, which evict and prefill them again; affinity keeps
    each on the replica that holds it."""
    profile = PROFILE.with_name("llama-3.1-8b-instruct-h100-small-kv.toml")  # docs/model.md's example

    def run(routing: str) -> dict:
        done = run_cli(
            "simulate", "--profile", str(profile), "--gpus", "4", "--rps", "60", "--duration", "40", "--warmup", "5",
            "--shared-prefix", "2000:32", "--prompt-tokens", "200", "--output-tokens", "128", "--stream",
            "--prefix-caching", "--routing", routing, "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    affinity, round_robin = run("prefix_affinity"), run("round_robin")
    print(f"\nTTFT P95 {affinity['ttft_p95_ms']:.1f} ms, hit rate {affinity['prefix_hit_rate']:.2f} (prefix_affinity) "
          f"vs {round_robin['ttft_p95_ms']:.1f} ms, {round_robin['prefix_hit_rate']:.2f} (round_robin)")  # fmt: skip
    assert affinity["prefix_hit_rate"] > round_robin["prefix_hit_rate"] + 0.3
    assert affinity["ttft_p95_ms"] < 0.5 * round_robin["ttft_p95_ms"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--routing", "nearest"], "'nearest' is not one of"),
        (["--routing", "round_robin", "--batching", "static"], "routing is a feature of continuous batching"),
    ],
)
def test_bad_routing_is_one_line_and_exit_2(flags, needle):
    done = run_cli("simulate", "--profile", str(PROFILE), "--gpus", "2", "--rps", "5", "--duration", "2", *flags)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("routing", ROUTED)
@pytest.mark.parametrize(("gpus", "mtbf_s", "mttr_s"), [(4, 40.0, 1e6), (1, 5.0, 2.0)])
def test_a_failed_gpus_queue_is_routed_again_and_none_waits_forever(routing, gpus, mtbf_s, mttr_s):
    """Four GPUs of two slots each, overloaded, one failing for good at 8.3 s: what waited for it is routed to
    the others (without that, 1 to 9 requests were never answered here). One GPU down for 2 s: what arrives
    meanwhile waits in the shared room and is routed when it is back. Only what a GPU ran fails with it."""
    model = ServiceModel(batching="continuous", prefix_caching=True, routing=routing, max_num_seqs=2,
                         faults={"mtbf_s": mtbf_s, "mttr_s": mttr_s}, **TOKENS)  # fmt: skip
    arr = shared_prefix_load(10.0 * gpus, 30.0, 7, "400:6:zipf=1.2", model)
    out = simulate_arrivals(model, arr, gpus, sample_every_s=1.0)
    up = [int(n) for _, n in out.fleet.up_changes]
    failures = sum(1 for before, after in itertools.pairwise(up) if after < before)
    outcomes = np.bincount(out.records.outcome, minlength=len(Outcome))
    print(f"\n{routing} on {gpus}: GPUs up {[(round(t, 1), int(n)) for t, n in out.fleet.up_changes]}, {outcomes}")
    assert failures >= 1 and (gpus == 1 or min(up) >= 1), out.fleet.up_changes  # the case as meant
    assert outcomes[Outcome.PENDING] == 0, outcomes  # every admitted request answered or failed
    assert 0 < outcomes[Outcome.FAILED] <= model.max_num_seqs * failures, outcomes


@pytest.mark.parametrize("routing", ROUTED)
def test_a_routed_fleet_scales_up_for_a_spike_and_the_new_gpu_takes_its_share(routing):
    """One GPU, a 3x spike from 5 s to 25 s: the autoscaler orders a second, which serves after its 3 s cold
    start and is routed to at once (an empty cache and queue); requests sent from 2 s after it serves start
    within tens of milliseconds, where on the fixed GPU they wait most of a second."""
    autoscale = {"enabled": True, "tick_s": 1, "scale_up_after_s": 2, "scale_down_after_s": 5, "max_gpus": 3}
    fixed = ServiceModel(batching="continuous", prefix_caching=True, routing=routing, max_num_seqs=8,
                         cold_start_s=3, **TOKENS)  # fmt: skip
    scaling = ServiceModel(**{**fixed.model_dump(), "autoscale": autoscale})
    rng = np.random.default_rng(3)
    spike = RateSchedule(rps=10, segments=({"kind": "spike", "at_s": 5.0, "duration_s": 20.0, "factor": 3.0},))
    arr = generate_arrivals(spike, 40, fixed.tier_shares, rng)
    shared = SharedPrefixSpec.parse("400:6:zipf=1.2")
    arr = Arrivals(arr.times, arr.tiers, (rng.integers(20, 400, len(arr)) + shared.tokens).astype(np.int32),
                   rng.integers(1, 60, len(arr)).astype(np.int32), shared.draw(len(arr), rng))  # fmt: skip
    scaled, alone = simulate_arrivals(scaling, arr, 1, sample_every_s=1.0), simulate_arrivals(fixed, arr, 1)
    events = [(e.action.value, e.t_s) for e in scaled.fleet.scale_events]
    assert [a for a, _ in events][:2] == ["ordered", "serving"], events
    late = (arr.times > events[1][1] + 2.0) & (arr.times < 25.0)

    def ttft_p95_ms(records) -> float:
        ok = late & (records.outcome == Outcome.OK)
        return float(np.percentile(records.first_token[ok] - records.scheduled[ok], 95)) * 1000.0

    print(f"\n{routing}: {events}; TTFT P95 from 2 s after the new GPU serves {ttft_p95_ms(scaled.records):.0f} ms, "
          f"{ttft_p95_ms(alone.records):.0f} ms on one GPU")  # fmt: skip
    assert np.bincount(scaled.records.outcome, minlength=len(Outcome))[Outcome.PENDING] == 0
    assert ttft_p95_ms(scaled.records) < 0.2 * ttft_p95_ms(alone.records)
