"""The streaming simulation: histograms against exact percentiles, chunking, flat memory, the precision stop."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from infer_plan.core.histogram import RELATIVE_ERROR, LogHistogram
from infer_plan.core.model import ServiceModel
from infer_plan.core.records import Outcome
from infer_plan.core.tiers import Tier
from infer_plan.sim.engines.engine import simulate_arrivals, simulate_chunks
from infer_plan.sim.inputs.arrivals import Arrivals, concatenate, split
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.planner import plan_capacity, sweep_capacity
from infer_plan.sim.results.sinks import RecordKeeper
from infer_plan.sim.runner import RunSettings, run_simulation

TOLERANCE = RELATIVE_ERROR + 1e-9


def test_histogram_percentiles_are_within_the_stated_error():
    rng = np.random.default_rng(1)
    values = rng.lognormal(np.log(120.0), 0.6, 200_000)
    hist, half = LogHistogram(), LogHistogram()
    hist.add(values)
    half.add(values[:100_000])
    other = LogHistogram()
    other.add(values[100_000:])
    half.merge(other)
    points = np.array([1.0, 50.0, 95.0, 99.0, 99.9])
    exact = np.percentile(values, points)
    for got in (hist.percentiles(points), half.percentiles(points)):
        assert np.all(np.abs(got / exact - 1) <= TOLERANCE), got / exact - 1
    assert hist.count == values.size and hist.mean_ms == pytest.approx(values.mean())
    assert hist.percentiles(np.array([100.0]))[0] == values.max()


def test_chunking_does_not_change_a_single_request():
    """The engine forgets settled requests as it loads the next chunk; no request may notice."""
    model = ServiceModel()
    arrivals = Workload.constant(3_000).arrivals(model, 8.0, seed=4)
    whole = simulate_arrivals(model, arrivals, gpus=3)  # 1 s chunks
    keeper = RecordKeeper()
    simulate_chunks(model, split(arrivals, 0.05), 3, keeper, horizon_s=8.0, tokens=False, shape=None)  # 160 chunks
    fine = keeper.records()
    assert np.array_equal(whole.records.outcome, fine.outcome)
    assert np.array_equal(whole.records.finished, fine.finished, equal_nan=True)
    assert len(fine) == len(arrivals)


@pytest.mark.parametrize("gpus", [16, 10])  # 10 GPUs serve ~9,100 req/s: overload, every tier sheds
def test_streaming_matches_the_exact_engine_at_10k_rps(gpus):
    model, workload = ServiceModel(), Workload.constant(10_000)
    settings = RunSettings(duration_s=8.0, warmup_s=2.0, seed=3)
    streamed = run_simulation(model, workload, settings, gpus)

    same = concatenate(workload.arrival_chunks(model, 10.0, seed=3))  # the very requests the streaming run drew
    exact = simulate_arrivals(model, same, gpus, horizon_s=10.0, seed=3)
    rec = exact.records
    window = (rec.scheduled >= 2.0) & (rec.scheduled < 10.0)
    assert streamed.requests == int(window.sum())
    for tier in Tier:
        mine = window & (rec.tier == tier)
        rejected = int((mine & (rec.outcome == Outcome.REJECTED)).sum())
        stats = streamed.per_tier[tier.label]
        assert stats.requests == int(mine.sum())
        assert round(stats.rejected_fraction * stats.requests) == rejected  # exactly the same requests shed
        latency = rec.latency_ms[mine & rec.ok]
        want = np.percentile(latency, [50, 95, 99])
        got = np.array([stats.p50_ms, stats.p95_ms, stats.p99_ms])
        assert np.all(np.abs(got / want - 1) <= TOLERANCE), (tier, got, want)
    if gpus == 10:
        assert streamed.rejected_fraction > 0.05


def _peak_bytes(duration_s: float) -> int:
    model, workload = ServiceModel(), Workload.constant(100_000)
    tracemalloc.start()
    try:
        result = run_simulation(model, workload, RunSettings(duration_s=duration_s, warmup_s=1.0), 120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.requests > 0.95 * 100_000 * duration_s
    return peak


@pytest.mark.slow
def test_memory_stays_flat_as_the_run_grows_ten_times_longer():
    short, long = _peak_bytes(8.0), _peak_bytes(80.0)
    print(f"peak traced memory: {short / 2**20:.1f} MiB for 8 s, {long / 2**20:.1f} MiB for 80 s")
    assert long < 1.2 * short


def test_precision_stops_early_on_an_easy_case_and_later_on_a_noisy_one():
    model = ServiceModel()
    settings = RunSettings(duration_s=120.0, warmup_s=5.0, precision=0.01, min_duration_s=10.0)
    # Easy: a light load on plenty of GPUs; every request waits for a batch and one cycle.
    easy = run_simulation(model, Workload.constant(2_000), settings, 6)
    # Noisy: one GPU at 90% of its full-batch capacity; queueing makes the P95 wander.
    noisy = run_simulation(model, Workload.constant(0.9 * 909.0), settings, 1)
    assert easy.precision is not None and noisy.precision is not None
    assert easy.precision.met and easy.duration_s == pytest.approx(10.0)
    assert noisy.duration_s > easy.duration_s
    for result in (easy, noisy):
        interval = result.precision.intervals["p95"]
        assert interval.low_ms <= result.p95_ms <= interval.high_ms
        assert result.precision.reached is not None
        assert (interval.high_ms - interval.low_ms) / 2 / result.p95_ms <= result.precision.reached + 1e-12

    # The interval holds the long-run value: the same noisy service measured for 20 minutes.
    long_run = run_simulation(model, Workload.constant(0.9 * 909.0), RunSettings(duration_s=1200.0, warmup_s=5.0), 1)
    interval = noisy.precision.intervals["p95"]
    print(f"noisy P95 {noisy.p95_ms:.1f} [{interval.low_ms:.1f}, {interval.high_ms:.1f}] after {noisy.duration_s} s; "
          f"20 min: {long_run.p95_ms:.1f}")  # fmt: skip
    assert interval.low_ms <= long_run.p95_ms <= interval.high_ms


def test_parallel_search_and_sweep_give_the_serial_answers():
    model = ServiceModel()
    workload = Workload.constant(3_000)
    settings = RunSettings(duration_s=10.0, warmup_s=2.0, precision=0.01, min_duration_s=10.0)
    serial = plan_capacity(model, workload, settings, jobs=1)
    parallel = plan_capacity(model, workload, settings, jobs=2)
    assert parallel.jobs == 2 and serial.jobs == 1
    assert parallel.gpus == serial.gpus
    assert [r.model_dump() for r in parallel.neighbours] == [r.model_dump() for r in serial.neighbours]
    assert parallel.precision == serial.precision
    rates = [1_000.0, 3_000.0, 6_000.0]
    assert sweep_capacity(model, workload, rates, settings, jobs=2) == sweep_capacity(model, workload, rates, settings)


def test_an_empty_run_and_a_single_request_still_summarise():
    model = ServiceModel()
    one = Arrivals(np.array([0.5]), np.array([int(Tier.PAID)], dtype=np.int8))
    out = simulate_arrivals(model, one, gpus=1)
    assert out.records.outcome.tolist() == [Outcome.OK]
    assert len(concatenate([])) == 0
    quiet = run_simulation(model, Workload.constant(0.0), RunSettings(duration_s=3.0, warmup_s=0.0), 1)
    assert quiet.requests == 0 and quiet.p95_ms is None
