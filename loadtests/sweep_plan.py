"""``capacity --from-sweep``: a fleet planned from one replica's measured knee instead of a simulation.

A sweep measured the highest rate one replica (the sweep's target: ``gpus`` GPUs) holds
within every SLO, and the throughput it saturates at. Replicas behind a balancer that
spreads requests evenly each see ``rps / replicas``, so the fleet needs

- ``ceil(rps / knee)`` replicas for the SLOs (each at or below its measured knee), and
- ``ceil(rps / (saturation x max_load))`` for the load ceiling (each busy at most that share);

the larger binds. The per-request figures shown are the knee step's: what each replica
was measured to give at its highest held rate, an upper bound at the plan's share.
"""

from __future__ import annotations

import math

from ..calibrate.from_sweep import load_sweep
from ..core.errors import UsageError
from ..core.schema import BackOfEnvelope, CapacityResult, SweepResult

__all__ = ["load_sweep", "plan_from_sweep"]


def plan_from_sweep(sweep: SweepResult, rps: float, max_load: float) -> CapacityResult:
    """Replicas (and GPUs) for ``rps`` from the measured knee and saturation (see the module docstring)."""
    if rps <= 0:
        raise UsageError("give --rps, the rate to plan for", field="rps")
    assert sweep.knee_rps is not None
    knee, per_replica = sweep.knee_rps, sweep.gpus or 1
    for_slos = math.ceil(rps / knee - 1e-9)
    for_load = math.ceil(rps / (sweep.saturation_rps * max_load) - 1e-9) if sweep.saturation_rps else 0
    replicas = max(for_slos, for_load, 1)
    binding = "max_load" if for_load > for_slos else "slos (the measured knee)"
    at_knee = next(s for s in sweep.steps if s.rps == knee)
    lines = [
        f"measured knee = {knee:,.2f} req/s per replica of {per_replica} GPU(s), in [{sweep.knee_low_rps:,.2f}, "
        + (f"{sweep.knee_high_rps:,.2f})" if sweep.knee_high_rps else "not reached)"),
        f"replicas for the SLOs = ceil({rps:,.2f} / {knee:,.2f}) = {for_slos}",
    ]
    if sweep.saturation_rps:
        lines.append(
            f"replicas at the {max_load:.0%} ceiling = ceil({rps:,.2f} / ({sweep.saturation_rps:,.2f} x {max_load:g}))"
            f" = {for_load}"
        )
    lines.append(f"GPUs = {replicas} replicas x {per_replica} = {replicas * per_replica}")
    load = rps / (replicas * sweep.saturation_rps) if sweep.saturation_rps else None
    return CapacityResult(
        gpus=replicas * per_replica,
        rps=rps,
        p95_ms=at_knee.p95_ms,
        ttft_p95_ms=at_knee.ttft_p95_ms,
        itl_p95_ms=at_knee.itl_p95_ms,
        batching="measured",
        per_tier_p95_ms={},
        load_factor=load,
        gpu_busy=load,
        rejected_fraction=at_knee.reject_rate,
        binding_constraint=binding,
        constraints={**sweep.slos, "max_load": max_load},
        back_of_envelope=BackOfEnvelope(
            cycle_ms=0.0,
            per_gpu_rps=knee / per_replica,
            raw_gpus=rps / knee * per_replica,
            gpus_at_ceiling=max(for_load, 1) * per_replica,
            max_load=max_load,
            arithmetic=lines,
        ),
        explanation=[
            f"Planned from a measured sweep of {sweep.url} ({len(sweep.steps)} steps of {sweep.step_s:g} s), "
            "not simulated: each replica takes an even share of the load, at most its knee. Latencies shown are "
            f"those measured at the knee ({knee:,.2f} req/s per replica).",
        ],
        neighbours=[],
        search_limit=replicas * per_replica,
        duration_s=sweep.step_s,
        warmup_s=sweep.warmup_s,
        seed=0,
    )
