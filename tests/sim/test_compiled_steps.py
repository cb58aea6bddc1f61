"""Continuous batching's compiled loop: the interpreted engine's answers, request by request, in a bounded window.

The interpreted engine (:mod:`infer_plan.sim.engines.step_engine`) is the reference; both are also held to the
step-by-step reference in ``test_tokens.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.prompt_blocks import TraceHashes
from infer_plan.core.records import Outcome
from infer_plan.sim import RateSchedule, RunSettings, Workload
from infer_plan.sim.engines.compiled_steps import CompiledSteps, compiled_applies
from infer_plan.sim.engines.engine import simulate_arrivals, simulate_chunks
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals, split
from infer_plan.sim.inputs.shared_prefix import SharedPrefixSpec
from infer_plan.sim.results.sinks import RecordKeeper
from infer_plan.sim.runner import run_simulation

# The example profile's step formula (BLIS's coefficients for Llama-3.1-8B on an H100) and its engine overheads.
STEPS = {"decode_step_ms": 5.75, "prefill_ms_per_token": 0.01725, "decode_ms_per_seq": 0.006}
OVERHEADS = {"request_overhead_ms": 0.23, "tokenize_ms_per_token": 0.00175, "output_token_ms": 3.36}


def workload(rps: float, seconds: float, shares: tuple[float, ...], seed: int = 0) -> Arrivals:
    rng = np.random.default_rng(seed)
    arr = generate_arrivals(RateSchedule(rps=rps), seconds, shares, rng)
    n = len(arr)
    prompt = rng.lognormal(np.log(400), 0.8, n).clip(1, 6000).astype(np.int32)
    output = rng.lognormal(np.log(100), 0.9, n).clip(1, 2000).astype(np.int32)
    return Arrivals(arr.times, arr.tiers, prompt, output)


@pytest.mark.parametrize(
    ("extra", "rps", "gpus"),
    [
        ({}, 600, 8),
        (OVERHEADS, 600, 8),  # long prompts overtaken by short ones sent just after
        ({**OVERHEADS, "kv_cache_tokens": 40_000, "max_num_seqs": 64}, 500, 6),  # KV binds
        ({**OVERHEADS, "max_num_seqs": 32, "backpressure": {"queue_limit": 200}}, 1200, 6),  # overload: zones shed
    ],
)
def test_the_compiled_loop_answers_as_the_interpreted_engine_request_by_request(extra, rps, gpus):
    model = ServiceModel(batching="continuous", **STEPS, **extra)
    arr = workload(rps, 120.0, model.tier_shares, seed=rps)
    interpreted = simulate_arrivals(model, arr, gpus, compiled=False, sample_every_s=1.0)
    compiled = simulate_arrivals(model, arr, gpus, compiled=True, sample_every_s=1.0)
    a, b = interpreted.records, compiled.records
    assert len(b) == len(arr) and np.array_equal(a.scheduled, b.scheduled)  # every request, in arrival order
    assert np.array_equal(a.outcome, b.outcome) and np.array_equal(a.tier, b.tier)
    np.testing.assert_allclose(b.first_token, a.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(b.finished, a.finished, atol=1e-9, equal_nan=True)
    assert interpreted.itl is not None and compiled.itl is not None
    np.testing.assert_allclose(np.sort(compiled.itl.gaps_ms), np.sort(interpreted.itl.gaps_ms), atol=1e-9)
    assert compiled.itl.counts.sum() == interpreted.itl.counts.sum()
    np.testing.assert_allclose(np.sort(compiled.batch_end), np.sort(interpreted.batch_end), atol=1e-9)
    for key in ("t_s", "queue_depth", "offered_rps", "load_factor"):  # the monitor, sample by sample
        np.testing.assert_allclose(compiled.fleet.timeseries[key], interpreted.fleet.timeseries[key], err_msg=key)
    if "backpressure" in extra:
        assert (a.outcome == Outcome.REJECTED).sum() > 100, "the overload case must shed"


def behind_system_prompts(arr: Arrivals, spec: str, seed: int, uncached: float = 0.0) -> Arrivals:
    """The same requests after one of a few shared system prompts (a share ``uncached`` with none)."""
    shared = SharedPrefixSpec.parse(spec)
    rng = np.random.default_rng(seed)
    prefixes = shared.draw(len(arr), rng)
    prefixes[rng.random(len(arr)) < uncached] = None
    has = np.array([p is not None for p in prefixes])
    return arr.with_lengths(arr.prompt_tokens + shared.tokens * has, arr.output_tokens, prefixes)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("extra", "rps", "gpus", "spec", "uncached"),
    [
        ({}, 300, 4, "1024:8:zipf=1.1", 0.0),  # no KV limit: nothing evicted
        ({**OVERHEADS, "kv_cache_tokens": 40_000, "max_num_seqs": 64}, 250, 6, "1024:8:zipf=1.1", 0.0),  # LRU binds
        ({**OVERHEADS, "kv_cache_tokens": 20_000, "max_num_seqs": 64}, 250, 6, "700:50:zipf=0.8", 0.3),
        ({**OVERHEADS, "kv_cache_tokens": 4_000, "max_num_seqs": 16}, 100, 6, "1024:8:zipf=1.1", 0.0),  # refusals
        (
            {**OVERHEADS, "max_num_seqs": 32, "kv_cache_tokens": 30_000, "backpressure": {"queue_limit": 200}},
            900,
            6,
            "400:4",
            0.0,
        ),  # overload: zones shed
    ],
)
def test_prefix_caching_in_the_compiled_loop_answers_as_the_interpreted_engine(extra, rps, gpus, spec, uncached):
    model = ServiceModel(batching="continuous", prefix_caching=True, **STEPS, **extra)
    arr = behind_system_prompts(workload(rps, 60.0, model.tier_shares, seed=rps), spec, rps, uncached)
    a = simulate_arrivals(model, arr, gpus, compiled=False, sample_every_s=1.0)
    b = simulate_arrivals(model, arr, gpus, compiled=True, sample_every_s=1.0)
    assert np.array_equal(a.records.outcome, b.records.outcome)
    np.testing.assert_allclose(b.records.first_token, a.records.first_token, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(b.records.finished, a.records.finished, atol=1e-9, equal_nan=True)
    assert np.array_equal(b.records.cached_tokens, a.records.cached_tokens)
    assert a.itl is not None and b.itl is not None
    np.testing.assert_allclose(np.sort(b.itl.gaps_ms), np.sort(a.itl.gaps_ms), atol=1e-9)
    np.testing.assert_allclose(np.sort(b.batch_end), np.sort(a.batch_end), atol=1e-9)
    hit = a.records.cached_tokens.sum() / arr.prompt_tokens.sum()
    assert 0.05 < hit < 0.9, "hits and misses both: the case means it"
    if extra.get("kv_cache_tokens") == 4_000:
        assert (a.records.outcome == Outcome.CLIENT_ERROR).sum() > 10, "prompts longer than the cache are refused"


def test_the_compiled_cache_grows_its_pools_and_keys_nothing_but_system_prompts():
    """Few sequences and a large cache: the cached runs of finished requests outgrow the pools sized for one
    moment, which double mid-run with the answers unchanged. A trace's hash ids run in the interpreted engine."""
    model = ServiceModel(batching="continuous", prefix_caching=True, max_num_seqs=4, kv_cache_tokens=400_000, **STEPS)
    arr = behind_system_prompts(workload(40, 60.0, model.tier_shares, seed=3), "512:5", 3)
    keeper = RecordKeeper()
    steps = CompiledSteps(model, 2, keeper, horizon_s=60.0, sample_every_s=1.0, load_factor=lambda r, g: 0.0)
    first_size = steps.cache["run_pool"].size
    steps.run(split(arr, 1.0))
    assert steps.cache["run_pool"].size >= 4 * first_size
    interpreted = simulate_arrivals(model, arr, 2, compiled=False).records
    np.testing.assert_allclose(keeper.records().first_token, interpreted.first_token, atol=1e-9, equal_nan=True)
    assert np.array_equal(keeper.records().cached_tokens, interpreted.cached_tokens)

    ids = np.empty(len(arr), dtype=object)
    ids[:] = [TraceHashes((i % 7, i), 64) for i in range(len(arr))]
    traced = arr.with_lengths(arr.prompt_tokens, arr.output_tokens, ids)
    with pytest.raises(ValueError, match="compiled loop"):
        simulate_arrivals(model, traced, 2, compiled=True)
    assert simulate_arrivals(model, traced, 2).records.cached_tokens.sum() > 0  # the default: the interpreted engine


def test_a_long_run_holds_a_window_not_the_run():
    """The window holds the requests of about one load plus those still in the system (a request is handed over
    in arrival order, so the longest one in flight holds back those after it): five times the run, not five
    times the memory."""
    model = ServiceModel(batching="continuous", **STEPS, **OVERHEADS)
    windows = []
    for seconds in (30.0, 150.0):
        arr = workload(3_000, seconds, model.tier_shares)
        keeper = RecordKeeper()
        steps = CompiledSteps(model, 80, keeper, horizon_s=seconds, sample_every_s=1.0, load_factor=lambda r, g: 0.0)
        steps.run(split(arr, 1.0))
        records = keeper.records()
        assert np.array_equal(records.scheduled, arr.times)  # each request handed over once, in arrival order
        assert (records.outcome == Outcome.OK).mean() > 0.999
        in_system = 3_000 * float(np.nanmax(records.finished - records.scheduled))
        windows.append(steps.state["rf"].shape[1])
        assert windows[-1] <= 2 * (CompiledSteps.LOAD_REQUESTS + in_system)  # grown by doubling, at most once past
    assert len(arr) > 400_000 and windows[1] <= 2 * windows[0] and windows[1] < len(arr) / 2


def test_a_precision_stop_ends_a_continuous_run_early():
    model = ServiceModel(batching="continuous", **STEPS, **OVERHEADS)
    workload_ = Workload(schedule=RateSchedule(rps=800), prompt_tokens=512, output_tokens=128)
    settings = RunSettings(duration_s=600, warmup_s=5, precision=0.05, min_duration_s=10)
    result = run_simulation(model, workload_, settings, 12, keep_timeseries=False)
    assert result.precision is not None and result.precision.met
    assert result.duration_s < 100
    assert result.requests == pytest.approx(800 * result.duration_s, rel=0.05)


@pytest.mark.parametrize(
    "extra",
    [{"cycle_jitter": (0.8, 1.0, 1.3)}, {"faults": {"mtbf_s": 100.0}}, {"autoscale": {"enabled": True}}],
    ids=["step spread", "failures", "autoscaler"],
)
def test_what_the_compiled_loop_does_not_run_goes_to_the_interpreted_engine(extra):
    model = ServiceModel(batching="continuous", **STEPS, **extra)
    assert not compiled_applies(model)
    arr = workload(50, 5.0, model.tier_shares)
    with pytest.raises(ValueError, match="compiled loop"):
        simulate_chunks(
            model, split(arr, 1.0), 2, RecordKeeper(), horizon_s=5.0, tokens=True, shape=None, compiled=True
        )
    served = simulate_arrivals(model, arr, 2).records.outcome == Outcome.OK  # the default picks the one that runs
    assert served.mean() > 0.9
