"""The latency knee (sim/planning/knee.py): where a replica's simulated TTFT P95 has doubled, short of full load."""

from __future__ import annotations

import pytest
from infer_plan.core import ServiceModel
from infer_plan.sim import RateSchedule
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.knee import latency_knee_rps
from infer_plan.sim.runner import RunSettings, run_simulation

# 8 ms steps + 0.5 ms a sequence + 0.05 ms a prompt token, 8 sequences: 128/32-token requests cost ~56 ms at full
# occupancy (17.9 req/s by the arithmetic).
MODEL = ServiceModel(
    batching="continuous", decode_step_ms=8.0, decode_ms_per_seq=0.5, prefill_ms_per_token=0.05, max_num_seqs=8
)
LENGTHS = Workload(schedule=RateSchedule(rps=1.0), prompt_tokens="128", output_tokens="32", stream=True)


def ttft_p95(rps: float) -> float:
    at = LENGTHS.model_copy(update={"schedule": RateSchedule(rps=rps)})
    result = run_simulation(MODEL, at, RunSettings(duration_s=300.0), gpus=1, keep_timeseries=False)
    assert result.ttft_p95_ms is not None
    return result.ttft_p95_ms


def test_the_knee_is_where_the_ttft_p95_doubles_short_of_the_arithmetic_throughput():
    knee = latency_knee_rps(MODEL, LENGTHS)
    idle = ttft_p95(0.05 * MODEL.per_gpu_rps(LENGTHS.shape(MODEL)))
    assert 0.3 * MODEL.per_gpu_rps(LENGTHS.shape(MODEL)) < knee < 0.95 * MODEL.per_gpu_rps(LENGTHS.shape(MODEL))
    assert ttft_p95(knee) <= 2.0 * idle < ttft_p95(1.1 * knee)


def test_a_knee_needs_a_factor_above_one():
    with pytest.raises(ValueError, match='"factor" must be > 1'):
        latency_knee_rps(MODEL, LENGTHS, factor=1.0)
