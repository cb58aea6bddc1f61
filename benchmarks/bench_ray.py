"""What Ray adds per batch: a batch's round trip through a Ray actor against the in-process sim backend.

Run: python benchmarks/bench_ray.py [--batches 300] [--size 100]
Both run the sim engine with every cost of the cycle set to 0, so the time measured is
the transport alone: for Ray, the call into the actor, its event loop and the answer
back (one local Ray, started here and stopped after). Prints P50 and P95 of each and
their difference, then what that difference does to `capacity --rps 10000` when added
to the cycle (PCIe in) in the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import numpy as np
from infer_plan.core.model import ServiceModel
from infer_plan.server.backends.base import Backend, Generate
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.planner import plan_capacity
from infer_plan.sim.runner import RunSettings

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def round_trips(backend: Backend, batches: int, size: int) -> np.ndarray:
    await backend.start()
    try:
        requests = [Generate(f"request {i}") for i in range(size)]
        for _ in range(20):  # warm-up: connections, the actor's first call
            await backend.run_batch(requests, 0)
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            await backend.run_batch(requests, 0)
            times.append((time.perf_counter() - start) * 1000.0)
        return np.asarray(times)
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    free = ServiceModel(pcie_in_ms=0.0, kernel_ms=0.0, pcie_out_ms=0.0)
    local = asyncio.run(round_trips(Backend.create("sim", free), args.batches, args.size))
    ray = asyncio.run(round_trips(Backend.create("ray", free, {"actors": 1}), args.batches, args.size))
    print(f"batch of {args.size}, {args.batches} batches, cycle 0 ms")
    rows = {"in-process sim": local, "Ray actor (sim inside)": ray}
    for name, t in rows.items():
        print(f"  {name:<24} P50 {np.percentile(t, 50):7.3f} ms  P95 {np.percentile(t, 95):7.3f} ms")
    added = {q: float(np.percentile(ray, q) - np.percentile(local, q)) for q in (50, 95)}
    print(f"  Ray adds                 P50 {added[50]:7.3f} ms  P95 {added[95]:7.3f} ms")

    model = ServiceModel()
    settings = RunSettings(duration_s=30.0, warmup_s=5.0, precision=0.01)
    for label, extra in (("cycle as designed", 0.0), ("+ Ray's P50", added[50]), ("+ Ray's P95", added[95])):
        with_ray = model.model_copy(update={"pcie_in_ms": model.pcie_in_ms + extra})
        plan = plan_capacity(with_ray, Workload.constant(10_000), settings)
        print(f"  capacity --rps 10000, {label:<18} ({with_ray.gpu_cycle_ms():.2f} ms cycle): {plan.gpus} GPUs, "
              f"P95 {plan.p95_ms:.1f} ms, arithmetic {plan.back_of_envelope.gpus_at_ceiling}")  # fmt: skip
    print(f"  (medians: in-process {statistics.median(local):.3f} ms, Ray {statistics.median(ray):.3f} ms)")


if __name__ == "__main__":
    main()
