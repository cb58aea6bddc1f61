"""Where queueing starts to dominate: the rate at which one replica's TTFT P95 has doubled.

A continuous engine's latency is flat while it has room and climbs steeply once requests
wait for a slot; the rate where it turns is what a user means by "the knee". The
arithmetic throughput (``ServiceModel.per_gpu_rps``, every slot full) lies past it: at
85% of that rate a simulated engine is already busy nearly all the time and its queue
grows for minutes, so latencies measured there depend on how long one watches. This
module defines two knees by simulation instead:

- :func:`latency_knee_rps`: the highest rate at which the simulated TTFT P95 stays within
  ``factor`` times its value with the engine nearly idle (the fidelity benchmark places
  its loads by it);
- :func:`slo_knee_rps`: the highest rate at which every SLO set holds, simulated for as
  long as a load test's step watches (``loadtest --sweep`` sets it beside the knee it
  measures, and ``calibrate --from-sweep`` moves it onto a measured one).
"""

from __future__ import annotations

from ...core.model import ServiceModel
from ..inputs.workload import Workload
from ..runner import RunSettings, run_simulation
from .planner import failures

__all__ = ["latency_knee_rps", "slo_knee_rps"]

IDLE_SHARE = 0.05  # of the arithmetic throughput: the "nearly idle" reference rate
BISECTIONS = 12


def latency_knee_rps(
    model: ServiceModel, workload: Workload, *, factor: float = 2.0, duration_s: float = 300.0, seed: int = 0
) -> float:
    """The highest rate (req/s, one GPU) at which the simulated TTFT P95 is within ``factor`` x its idle value.

    ``workload`` gives the lengths (its rate is replaced); one simulated run of
    ``duration_s`` per probe, bisected between the idle rate and the arithmetic throughput.
    """
    if factor <= 1:
        raise ValueError(f'"factor" must be > 1 (got {factor})')
    top = model.per_gpu_rps(workload.shape(model)) / workload.requests_per_arrival  # the schedule's rate
    settings = RunSettings(duration_s=duration_s, seed=seed)

    def ttft_p95(rps: float) -> float:
        result = run_simulation(model, workload.at_rate(rps), settings, gpus=1, keep_timeseries=False)
        assert result.ttft_p95_ms is not None, "a knee needs a token model"
        return result.ttft_p95_ms

    limit = factor * ttft_p95(IDLE_SHARE * top)
    low, high = IDLE_SHARE * top, top
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if ttft_p95(mid) <= limit else (low, mid)
    return low


def slo_knee_rps(
    model: ServiceModel, workload: Workload, gpus: int, settings: RunSettings, *, resolution: float = 0.01
) -> float | None:
    """The highest rate at which every SLO of ``model`` holds on ``gpus`` GPUs, simulated as ``settings`` say.

    The load ceiling is a planning margin, not an objective, so it is not held here. A
    sweep's steps are short and a P95 near saturation depends on how long one watches, so
    ``settings`` should give the step's duration and warm-up (and replications, which
    average out one run's luck). Bisected between a twentieth of the arithmetic throughput
    and 1.2 times it to ``resolution``; None when even the lowest rate fails.
    """
    top = gpus * model.per_gpu_rps(workload.shape(model)) / workload.requests_per_arrival  # the schedule's rate

    def holds(rps: float) -> bool:
        result = run_simulation(model, workload.at_rate(rps), settings, gpus=gpus, keep_timeseries=False)
        return not [name for name in failures(model, result) if name != "load"]

    low, high = IDLE_SHARE * top, 1.2 * top
    if not holds(low):
        return None
    if holds(high):
        return high
    while high - low > resolution * low:
        mid = (low + high) / 2
        low, high = (mid, high) if holds(mid) else (low, mid)
    return low
