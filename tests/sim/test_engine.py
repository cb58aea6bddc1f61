"""The dispatch rule on hand-checkable scenarios, and against the per-request reference model."""

import numpy as np
import pytest
from infer_plan.core import Outcome, ServiceModel, Tier
from infer_plan.sim import RateSchedule, RunSettings, Workload, run_simulation
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.references.reference import simulate_reference


def arrivals(times, tiers=None):
    t = np.asarray(times, dtype=float)
    k = np.full(t.size, Tier.FREE, dtype=np.int8) if tiers is None else np.asarray(tiers, dtype=np.int8)
    return Arrivals(times=t, tiers=k)


def test_lone_request_waits_for_the_timeout_then_one_cycle(model):
    out = simulate_arrivals(model, arrivals([0.0]), gpus=1)
    assert out.records.finished[0] == pytest.approx((model.max_wait_ms + model.gpu_cycle_ms()) / 1000)


def test_full_batch_leaves_at_once_and_the_next_waits_for_the_gpu(model):
    times = np.linspace(0.0, 0.010, 150)  # 150 requests in 10 ms, one GPU
    out = simulate_arrivals(model, arrivals(times), gpus=1)
    cycle = model.gpu_cycle_ms() / 1000
    first, rest = out.records.finished[:100], out.records.finished[100:]
    assert np.all(first == pytest.approx(times[99] + cycle))  # 100th arrival fills the batch
    assert np.all(rest == pytest.approx(times[99] + 2 * cycle))  # GPU free again after one cycle
    assert out.batch_size.tolist() == [100, 50]


def test_batch_takes_enterprise_then_paid_then_free_fifo_inside_a_tier(model):
    # A lone request holds the GPU from 40 ms to 150 ms; meanwhile 120 queue up:
    # 60 free first, then 40 paid, then 20 enterprise. At 150 ms the batch takes 100 by priority.
    tiers = [Tier.FREE] + [Tier.FREE] * 60 + [Tier.PAID] * 40 + [Tier.ENTERPRISE] * 20
    times = np.concatenate(([0.0], np.linspace(0.05, 0.06, 120)))
    out = simulate_arrivals(model, arrivals(times, tiers), gpus=1)
    cycle = model.gpu_cycle_ms() / 1000
    second = np.isclose(out.records.finished, 0.150 + cycle)
    assert second.sum() == 100
    assert second[61:].all()  # every paid and enterprise request
    assert second[1:41].all() and not second[41:61].any()  # the 40 oldest free, FIFO


def test_p50_at_light_load_is_timeout_plus_cycle(model):
    result = run_simulation(model, Workload.constant(10), RunSettings(duration_s=300, warmup_s=10), gpus=1)
    assert result.p50_ms == pytest.approx(model.max_wait_ms + model.gpu_cycle_ms(), abs=0.5)


def test_saturated_throughput_is_gpus_times_batch_over_cycle(model):
    gpus = 2
    capacity = gpus * model.max_batch / (model.gpu_cycle_ms() / 1000)
    result = run_simulation(model, Workload.constant(2 * capacity), RunSettings(duration_s=60, warmup_s=5), gpus)
    assert result.throughput_rps == pytest.approx(capacity, rel=0.01)
    assert result.gpu_busy == pytest.approx(1.0, abs=0.01)
    assert result.mean_batch_size == pytest.approx(model.max_batch)


def test_overload_orders_tiers_and_sheds_free_first(model):
    capacity = model.max_batch / (model.gpu_cycle_ms() / 1000)
    result = run_simulation(model, Workload.constant(2 * capacity), RunSettings(duration_s=60, warmup_s=5), gpus=1)
    tiers = result.per_tier
    # Means are exact; P95s come from 1%-wide histogram buckets, and the top two tiers' share one here.
    assert tiers["enterprise"].mean_ms < tiers["paid"].mean_ms < tiers["free"].mean_ms
    assert tiers["enterprise"].p95_ms <= tiers["paid"].p95_ms < tiers["free"].p95_ms
    assert tiers["free"].rejected_fraction > tiers["paid"].rejected_fraction >= tiers["enterprise"].rejected_fraction
    assert tiers["enterprise"].rejected_fraction == 0.0
    # The first request ever shed is a free one.
    arr = generate_arrivals(RateSchedule(rps=2 * capacity), 10, model.tier_shares, np.random.default_rng(0))
    out = simulate_arrivals(model, arr, gpus=1)
    assert arr.tiers[np.argmax(out.records.outcome == Outcome.REJECTED)] == Tier.FREE


def test_no_overlap_cycle_is_assembly_plus_gpu_time():
    model = ServiceModel(overlap=False)
    out = simulate_arrivals(model, arrivals([0.0]), gpus=1)
    assert out.records.finished[0] == pytest.approx(0.150)
    assert model.per_gpu_rps() == pytest.approx(100 / 0.150)
    result = run_simulation(model, Workload.constant(1000), RunSettings(duration_s=30, warmup_s=5), gpus=1)
    assert result.throughput_rps == pytest.approx(model.per_gpu_rps(), rel=0.01)


@pytest.mark.parametrize(("rps", "gpus"), [(50, 1), (800, 1), (1500, 2), (3000, 2), (12000, 16)])
def test_fast_engine_matches_per_request_reference(model, rps, gpus):
    arr = generate_arrivals(RateSchedule(rps=rps), 8.0, model.tier_shares, np.random.default_rng(rps))
    out = simulate_arrivals(model, arr, gpus)
    admitted, completion = simulate_reference(model, arr, gpus)
    assert (out.records.outcome != Outcome.REJECTED).tolist() == admitted.tolist()
    np.testing.assert_allclose(out.records.finished, completion, atol=1e-9, equal_nan=True)


def test_shared_queue_time_shifts_every_answer_but_not_the_batches(model):
    # Instances sharing a Redis queue are one pool of their GPUs; the Redis path only adds its hop.
    arr = generate_arrivals(RateSchedule(rps=1500), 8.0, model.tier_shares, np.random.default_rng(3))
    shared = model.model_copy(update={"shared_queue_ms": 2.5})
    base, hop = simulate_arrivals(model, arr, gpus=2), simulate_arrivals(shared, arr, gpus=2)
    np.testing.assert_allclose(hop.records.finished - base.records.finished, 0.0025, atol=1e-12)
    assert hop.batch_size.tolist() == base.batch_size.tolist()
    _, reference = simulate_reference(shared, arr, gpus=2)
    np.testing.assert_allclose(hop.records.finished, reference, atol=1e-9, equal_nan=True)


def test_same_seed_same_result_and_other_seeds_inside_the_interval(model):
    settings = RunSettings(duration_s=20, warmup_s=2, seed=1, replications=8)
    workload = Workload.constant(800)
    a = run_simulation(model, workload, settings, gpus=1)
    b = run_simulation(model, workload, settings, gpus=1)
    assert a.model_dump() == b.model_dump()
    p95 = a.intervals["p95_ms"]
    assert p95.ci95_low < p95.mean < p95.ci95_high
    others = [
        run_simulation(model, workload, RunSettings(duration_s=20, warmup_s=2, seed=s), 1).p95_ms
        for s in range(100, 106)
    ]
    assert all(p95.pi95_low <= v <= p95.pi95_high for v in others)
    assert p95.ci95_low <= float(np.mean(others)) + 3 * float(np.std(others)) / np.sqrt(len(others))
    again = run_simulation(model, workload, RunSettings(duration_s=20, warmup_s=2, seed=100, replications=8), 1)
    assert again.intervals["p95_ms"].ci95_low <= p95.ci95_high and p95.ci95_low <= again.intervals["p95_ms"].ci95_high


def test_warmup_is_excluded(model):
    result = run_simulation(model, Workload.constant(100), RunSettings(duration_s=10, warmup_s=5), gpus=1)
    assert result.requests == pytest.approx(1000, rel=0.15)


def test_gpu_failures_fail_their_batch_and_account_for_every_request():
    model = ServiceModel(faults={"mtbf_s": 5.0, "mttr_s": 2.0})
    arr = generate_arrivals(RateSchedule(rps=1500), 60.0, model.tier_shares, np.random.default_rng(3))
    out = simulate_arrivals(model, arr, gpus=3, seed=3)
    assert (out.records.outcome == Outcome.FAILED).any()
    served = out.records.ok
    admitted = out.records.outcome != Outcome.REJECTED
    assert not np.isnan(out.records.finished[admitted]).any()  # every admitted request got an answer
    assert (out.records.finished[served] >= arr.times[served]).all()
    assert out.fleet.up_changes[:, 1].min() < 3  # GPUs really went down


def test_autoscaler_adds_a_gpu_after_sustained_load_and_cold_start():
    model = ServiceModel(autoscale={"enabled": True, "scale_down_after_s": 10_000}, cold_start_s=300)
    gpus = 2
    per_gpu = model.per_gpu_rps()
    # 90% load from t=0: above the 80% trigger.
    arr = generate_arrivals(RateSchedule(rps=0.9 * gpus * per_gpu), 700.0, model.tier_shares, np.random.default_rng(0))
    out = simulate_arrivals(model, arr, gpus, sample_every_s=5)
    ts = out.fleet.timeseries
    first_up = ts["t_s"][np.argmax(ts["gpus_up"] > gpus)]
    # Ordered after 120 s above the trigger, serving 300 s later (ticks of 5 s).
    assert 120 + 300 <= first_up <= 120 + 300 + 10
    assert ts["gpus_provisioning"].max() >= 1


def test_spike_raises_the_offered_rate_only_inside_it():
    schedule = RateSchedule(rps=100, segments=({"kind": "spike", "at_s": 10, "duration_s": 5, "factor": 3},))
    assert schedule.rate_at(np.array([5.0, 12.0, 16.0])).tolist() == [100, 300, 100]
    arr = generate_arrivals(schedule, 20.0, (0.1, 0.3, 0.6), np.random.default_rng(0))
    inside = ((arr.times >= 10) & (arr.times < 15)).sum()
    assert inside == pytest.approx(1500, rel=0.1)
    assert len(arr) == pytest.approx(100 * 15 + 1500, rel=0.1)


def test_ramp_and_step_and_diurnal_shapes():
    schedule = RateSchedule(
        rps=100,
        segments=(
            {"kind": "step", "at_s": 10, "rps": 200},
            {"kind": "ramp", "start_s": 20, "end_s": 30, "to_rps": 400},
        ),
    )
    assert schedule.rate_at(np.array([0.0, 15.0, 25.0, 40.0])).tolist() == [100, 200, 300, 400]
    diurnal = RateSchedule(rps=100, segments=({"kind": "diurnal", "amplitude": 0.5, "period_s": 40},))
    assert diurnal.rate_at(np.array([10.0, 30.0])).tolist() == pytest.approx([150, 50])
