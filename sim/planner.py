"""The capacity planner: the smallest GPU count that meets every constraint.

The back-of-envelope arithmetic (:func:`back_of_envelope`) gives a lower bound and the
starting point; the simulation is the authority. Constraints are monotone in the GPU
count (more GPUs never raise load, latency or rejects in this model), so the search
walks up from the arithmetic's answer, doubling its step until a count passes, then
bisects back to the smallest passing one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..core.model import ServiceModel
from ..core.schema import BackOfEnvelope, CapacityResult, CapacityRow, SimulationResult, SweepPoint
from .runner import RunSettings, Workload, run_simulation

__all__ = ["Constraints", "back_of_envelope", "plan_capacity", "sweep_capacity"]

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Constraints:
    """What a GPU count must satisfy. Per-tier SLOs default to the overall one."""

    slo_p95_ms: float
    max_load: float
    max_reject: float = 0.001  # the design's 99.9% availability
    tier_slo_p95_ms: dict[str, float] | None = None
    check_tiers: bool = True

    def failures(self, result: SimulationResult) -> list[str]:
        failed = []
        if result.p95_ms is None or result.p95_ms > self.slo_p95_ms:
            failed.append("p95")
        if self.check_tiers:
            for tier, stats in result.per_tier.items():
                if stats.requests == 0:
                    continue
                slo = (self.tier_slo_p95_ms or {}).get(tier, self.slo_p95_ms)
                if stats.p95_ms is None or stats.p95_ms > slo:
                    failed.append(f"p95:{tier}")
        if result.load_factor > self.max_load + 1e-9:
            failed.append("load")
        if result.rejected_fraction + result.error_fraction > self.max_reject:
            failed.append("rejects")
        return failed


def back_of_envelope(model: ServiceModel, rps: float) -> BackOfEnvelope:
    """The design's arithmetic: per-GPU throughput, raw GPUs, GPUs at the load ceiling."""
    cycle = model.gpu_cycle_ms()
    per_gpu = model.per_gpu_rps()
    raw = rps / per_gpu
    # A tiny tolerance so that an exact multiple (e.g. 1.5 / 0.75 = 2) is not rounded up by float noise.
    at_ceiling = max(1, math.ceil(raw / model.max_load - 1e-9))
    parts = f"{model.pcie_in_ms:g} + {model.kernel_ms:g} + {model.pcie_out_ms:g}"
    if model.per_item_ms:
        parts += f" + {model.per_item_ms:g} x {model.max_batch}"
    if not model.overlap:
        parts = f"{model.max_wait_ms:g} (assembly holds the GPU) + " + parts
    lines = [
        f"cycle = {parts} = {cycle:g} ms per batch of up to {model.max_batch}",
        f"per-GPU throughput = {model.max_batch} / {cycle / 1000:g} s = {per_gpu:,.0f} req/s",
        f"raw GPUs = {rps:,.0f} / {per_gpu:,.0f} = {raw:.2f}",
        f"at the {model.max_load:.0%} ceiling = ceil({raw:.2f} / {model.max_load:g}) = ceil({raw / model.max_load:.2f})"
        f" = {at_ceiling}",
    ]
    return BackOfEnvelope(
        cycle_ms=cycle,
        per_gpu_rps=per_gpu,
        raw_gpus=raw,
        gpus_at_ceiling=at_ceiling,
        max_load=model.max_load,
        arithmetic=lines,
    )


def _row(gpus: int, result: SimulationResult, constraints: Constraints) -> CapacityRow:
    failed = constraints.failures(result)
    return CapacityRow(
        gpus=gpus,
        meets=not failed,
        failed=failed,
        p95_ms=result.p95_ms,
        per_tier_p95_ms={t: s.p95_ms for t, s in result.per_tier.items()},
        load_factor=result.load_factor,
        gpu_busy=result.gpu_busy,
        rejected_fraction=result.rejected_fraction,
        error_fraction=result.error_fraction,
    )


class _Evaluator:
    """Simulates each GPU count once, with the same arrivals (same seed) for all counts."""

    def __init__(
        self,
        model: ServiceModel,
        workload: Workload,
        settings: RunSettings,
        constraints: Constraints,
        progress: ProgressFn | None,
    ) -> None:
        self.model, self.workload, self.settings, self.constraints = model, workload, settings, constraints
        self.progress = progress
        self.results: dict[int, SimulationResult] = {}

    def __call__(self, gpus: int) -> SimulationResult:
        if gpus not in self.results:
            if self.progress:
                self.progress(f"simulating {gpus} GPUs")
            self.results[gpus] = run_simulation(self.model, self.workload, self.settings, gpus, keep_timeseries=False)
        return self.results[gpus]

    def meets(self, gpus: int) -> bool:
        return not self.constraints.failures(self(gpus))


def _smallest_passing(meets: Callable[[int], bool], start: int, limit: int) -> int | None:
    """Gallop up from ``start`` (steps 1, 2, 4, ...) to a passing count, then bisect down."""
    low_fail, candidate, step = start - 1, start, 1
    while not meets(candidate):
        low_fail = candidate
        if candidate >= limit:
            return None
        candidate = min(limit, candidate + step)
        step *= 2
    high_pass = candidate
    while high_pass - low_fail > 1:
        mid = (high_pass + low_fail) // 2
        if meets(mid):
            high_pass = mid
        else:
            low_fail = mid
    return high_pass


def plan_capacity(
    model: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    constraints: Constraints,
    *,
    max_gpus: int | None = None,
    neighbours: int = 2,
    sweep_rates: list[float] | None = None,
    progress: ProgressFn | None = None,
) -> CapacityResult:
    """Search the smallest GPU count meeting ``constraints`` and simulate its neighbours.

    With ``sweep_rates``, the same search at each rate gives the GPUs-versus-rps curve.
    """
    rps = workload.schedule.rps
    model = model.model_copy(update={"max_load": constraints.max_load})
    envelope = back_of_envelope(model, rps)
    # The load ceiling is arithmetic (load_factor is defined by the offered rate), so no
    # count below ceil(raw / max_load) can pass; start the simulated search there.
    start = max(1, envelope.gpus_at_ceiling)
    limit = max_gpus if max_gpus is not None else max(4 * start, start + 16)
    evaluate = _Evaluator(model, workload, settings, constraints, progress)
    best = _smallest_passing(evaluate.meets, start, limit) if start <= limit else None

    centre = best if best is not None else start
    table = [_row(g, evaluate(g), constraints) for g in range(max(1, centre - neighbours), centre + neighbours + 1)]
    chosen = evaluate(best) if best is not None else None
    binding = _binding_constraint(best, envelope, evaluate, constraints)
    explanation = _explain(best, envelope, chosen, binding, model)
    return CapacityResult(
        gpus=best,
        rps=rps,
        p95_ms=chosen.p95_ms if chosen else None,
        per_tier_p95_ms={t: s.p95_ms for t, s in chosen.per_tier.items()} if chosen else {},
        load_factor=chosen.load_factor if chosen else None,
        gpu_busy=chosen.gpu_busy if chosen else None,
        rejected_fraction=chosen.rejected_fraction if chosen else None,
        binding_constraint=binding,
        constraints={
            "slo_p95_ms": constraints.slo_p95_ms,
            "max_load": constraints.max_load,
            "max_reject": constraints.max_reject,
        },
        back_of_envelope=envelope,
        explanation=explanation,
        neighbours=table,
        search_limit=limit,
        duration_s=settings.duration_s,
        warmup_s=settings.warmup_for(workload),
        seed=settings.seed,
        overlap=model.overlap,
        sweep=sweep_capacity(model, sweep_rates, settings, constraints, max_gpus, progress) if sweep_rates else None,
    )


def _binding_constraint(
    best: int | None, envelope: BackOfEnvelope, evaluate: _Evaluator, constraints: Constraints
) -> str:
    if best is None:
        return "none found within the search limit"
    if best == 1:
        return "minimum fleet (one GPU)"
    below = constraints.failures(evaluate(best - 1))
    if below == ["load"]:
        return "load ceiling"
    return ", ".join(f for f in below if f != "load") or "load ceiling"


def _explain(
    best: int | None, envelope: BackOfEnvelope, chosen: SimulationResult | None, binding: str, model: ServiceModel
) -> list[str]:
    if best is None or chosen is None:
        return ["No GPU count up to the search limit met every constraint; raise --max-gpus or relax the SLO."]
    lines = []
    if best == envelope.gpus_at_ceiling:
        lines.append(f"The simulation agrees with the arithmetic: {best} GPUs, bound by the {binding}.")
    else:
        lines.append(
            f"The simulation needs {best} GPUs, {best - envelope.gpus_at_ceiling:+d} against the arithmetic's "
            f"{envelope.gpus_at_ceiling}: the binding constraint is {binding}."
        )
    cycle = model.gpu_cycle_ms(round(chosen.mean_batch_size))
    lines.append(
        f"gpu_busy {chosen.gpu_busy:.0%} vs load_factor {chosen.load_factor:.0%}: batches average"
        f" {chosen.mean_batch_size:.1f} of {model.max_batch}, and a partial batch costs a full {cycle:g} ms cycle."
    )
    return lines


def sweep_capacity(
    model: ServiceModel,
    rates: list[float],
    settings: RunSettings,
    constraints: Constraints,
    max_gpus: int | None = None,
    progress: ProgressFn | None = None,
) -> list[SweepPoint]:
    """The GPUs-versus-rps curve: one capacity search per rate."""
    points = []
    for rps in rates:
        result = plan_capacity(
            model, Workload.constant(rps), settings, constraints, max_gpus=max_gpus, neighbours=0, progress=progress
        )
        env = result.back_of_envelope
        points.append(
            SweepPoint(
                rps=rps,
                gpus=result.gpus,
                raw_gpus=env.raw_gpus,
                gpus_at_ceiling=env.gpus_at_ceiling,
                p95_ms=result.p95_ms,
            )
        )
    return points
