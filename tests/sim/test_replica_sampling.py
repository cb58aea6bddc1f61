"""Replica sampling: a continuous-batching fleet of N GPUs simulated as K of them at their share of the load.

Held to the full simulation where both run: the same answers, the same P95s to within the histogram's resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.sim import RunSettings, Workload
from infer_plan.sim.inputs.arrivals import ArrivalProcess
from infer_plan.sim.inputs.schedule import Ramp, RateSchedule, Spike, Step
from infer_plan.sim.planning.planner import plan_capacity
from infer_plan.sim.runner import DEFAULT_SAMPLE_GPUS, run_simulation, sampled_gpus
from infer_plan.sim.scenario import load_scenario

from tests.helpers import REPO

PROFILE = REPO / "examples/profiles/llama-3.1-8b-instruct-h100.toml"
PER_GPU_AT_70 = 56.0  # the example profile's 80 req/s per GPU at the 70% ceiling


def _model(**update) -> ServiceModel:
    return load_scenario(profile=PROFILE).model.model_copy(update=update)


def _workload(rps: float) -> Workload:
    return Workload(schedule=RateSchedule(rps=rps))


def test_a_sampled_run_sees_what_the_whole_fleet_sees():
    model, gpus = _model(), 72
    workload, settings = _workload(gpus * PER_GPU_AT_70), RunSettings(duration_s=30, seed=3)
    whole = run_simulation(model, workload, settings.model_copy(update={"sample_gpus": None}), gpus)
    sampled = run_simulation(model, workload, settings, gpus)
    assert whole.simulated_gpus is None and sampled.simulated_gpus == DEFAULT_SAMPLE_GPUS
    assert sampled.gpus == whole.gpus == gpus
    assert sampled.requests == pytest.approx(whole.requests * DEFAULT_SAMPLE_GPUS / gpus, rel=0.02)
    for key in ("ttft_p95_ms", "itl_p95_ms", "p95_ms", "ttft_p50_ms", "tpot_p95_ms", "gpu_busy", "mean_batch_size"):
        assert getattr(sampled, key) == pytest.approx(getattr(whole, key), rel=0.03), key
    for key in ("offered_rps", "throughput_rps", "goodput_rps", "output_tokens_per_s", "load_factor"):
        assert getattr(sampled, key) == pytest.approx(getattr(whole, key), rel=0.02), key
    # Over time too: the fleet's GPUs and the offered rate, scaled back from the sample.
    assert sampled.timeseries is not None and whole.timeseries is not None
    assert set(sampled.timeseries.gpus_up) == {gpus}
    assert np.mean(sampled.timeseries.offered_rps[5:]) == pytest.approx(
        np.mean(whole.timeseries.offered_rps[5:]), rel=0.03
    )


def test_capacity_answers_the_same_with_and_without_sampling():
    """Where both run, the search finds the same count and the answer's P95s agree within its precision."""
    model = _model()
    workload, settings = _workload(3_500), RunSettings(duration_s=30, seed=1)
    whole = plan_capacity(model, workload, settings.model_copy(update={"sample_gpus": None}), jobs=1)
    sampled = plan_capacity(model, workload, settings, jobs=1)
    assert whole.gpus is not None and whole.gpus > DEFAULT_SAMPLE_GPUS
    assert sampled.gpus == whole.gpus and sampled.binding_constraint == whole.binding_constraint
    assert sampled.simulated_gpus == DEFAULT_SAMPLE_GPUS and whole.simulated_gpus is None
    for key in ("ttft_p95_ms", "itl_p95_ms", "p95_ms"):
        assert getattr(sampled, key) == pytest.approx(getattr(whole, key), rel=0.03), key
    assert [row.meets for row in sampled.neighbours] == [row.meets for row in whole.neighbours]


def test_the_load_ceiling_of_a_sampled_run_is_the_schedules_so_the_search_is_monotone():
    """A sample's own arrival count wobbles; the load factor it reports is the offered rate's, exactly."""
    model = _model()
    settings = RunSettings(duration_s=10, warmup_s=2)
    for gpus in (900, 901):
        result = run_simulation(model, _workload(50_000), settings, gpus, keep_timeseries=False)
        assert result.simulated_gpus == DEFAULT_SAMPLE_GPUS
        assert result.offered_rps == 50_000
        shape = _workload(50_000).shape(model)
        assert result.load_factor == pytest.approx(model.load_factor(50_000, gpus, shape), rel=1e-9)


@pytest.mark.parametrize(
    ("model_update", "workload_update", "settings_update"),
    [
        ({"batching": "static"}, {}, {}),  # a static batch fills at the whole fleet's rate
        ({"autoscale": {"enabled": True}}, {}, {}),  # the autoscaler decides for the whole fleet
        ({"backpressure": {"queue_limit": 500}}, {}, {}),  # a fixed queue limit is the whole fleet's
        ({}, {"arrival": ArrivalProcess.CONSTANT}, {}),  # a share of evenly spaced arrivals is not evenly spaced
        ({}, {}, {"sample_gpus": None}),  # asked for every GPU
    ],
)
def test_every_gpu_is_simulated_where_the_fleet_is_coupled(model_update, workload_update, settings_update):
    model = ServiceModel.model_validate(_model().model_dump() | model_update)
    workload = _workload(10_000).model_copy(update=workload_update)
    assert sampled_gpus(model, workload, RunSettings().model_copy(update=settings_update), 500) == 500
    assert sampled_gpus(_model(), _workload(10_000), RunSettings(), 500) == DEFAULT_SAMPLE_GPUS
    assert sampled_gpus(_model(), _workload(10_000), RunSettings(), DEFAULT_SAMPLE_GPUS) == DEFAULT_SAMPLE_GPUS


def test_saving_every_request_simulates_every_gpu(tmp_path: Path):
    rows = tmp_path / "requests.csv"
    result = run_simulation(
        _model(), _workload(30 * PER_GPU_AT_70), RunSettings(duration_s=2, warmup_s=1), 30, save_requests=rows
    )
    assert result.simulated_gpus is None
    assert sum(1 for _ in rows.open()) - 1 == pytest.approx(30 * PER_GPU_AT_70 * 3, rel=0.05)


def test_a_schedule_scaled_is_the_same_shape_at_a_share_of_the_rate():
    schedule = RateSchedule(
        rps=1_000,
        segments=(
            Step(at_s=10, rps=2_000),
            Ramp(start_s=20, end_s=30, to_rps=500),
            Spike(at_s=40, duration_s=5, factor=3),
        ),
    )
    t = np.linspace(0, 60, 601)
    assert np.allclose(schedule.scaled(0.25).rate_at(t), 0.25 * schedule.rate_at(t))
