"""Simulator speed: batch-level engine vs the per-request SimPy model, and capacity's wall time.

Run: python benchmarks/bench_sim.py [--repeats 3] [--baseline-python PATH]
Prints medians of side-by-side runs (shared machines are noisy). With
``--baseline-python`` (the interpreter of another installed build) that build's engine
and its `capacity --rps 10000` run in the same rotation, each engine timing in a fresh
process of its own build, so two builds are compared side by side.
Targets (issue #2): >= 2 million simulated requests/s at 10k rps with tiers,
>= 20x the per-request model, `infer-plan capacity --rps 10000` under 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
from infer_plan.core import ServiceModel
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import generate_arrivals
from infer_plan.sim.references.reference import simulate_reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# Times the engine in whichever build the interpreter has (the service model moved to core in 0.2; the
# simulator's modules into sub-packages by role in 0.3).
_ENGINE_TIMING = """
import sys, time
import numpy as np
try:
    from infer_plan.core import ServiceModel
except ImportError:
    from infer_plan.sim import ServiceModel
from infer_plan.sim import RateSchedule
try:
    from infer_plan.sim.inputs.arrivals import generate_arrivals
    from infer_plan.sim.engines.engine import simulate_arrivals
except ImportError:
    from infer_plan.sim.arrivals import generate_arrivals
    from infer_plan.sim.engine import simulate_arrivals
model = ServiceModel()
arr = generate_arrivals(RateSchedule(rps=10_000), float(sys.argv[1]), model.tier_shares, np.random.default_rng(0))
start = time.perf_counter()
simulate_arrivals(model, arr, 16)
print(len(arr) / (time.perf_counter() - start))
"""


def compare_builds(builds: dict[str, str], repeats: int, seconds: float) -> None:
    """Engine speed and capacity's wall time of each build, in rotation, each in fresh processes."""
    engine: dict[str, list[float]] = {name: [] for name in builds}
    walls: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(repeats):
        for name, python in builds.items():
            timing = [python, "-c", _ENGINE_TIMING, str(seconds)]
            out = subprocess.run(timing, capture_output=True, text=True, check=True)
            engine[name].append(float(out.stdout))
            cli = [python, "-m", "infer_plan.cli", "capacity", "--rps", "10000", "--json"]
            walls[name].append(timed(lambda cli=cli: subprocess.run(cli, check=True, capture_output=True)))
    print(f"builds side by side, medians of {repeats} in rotation:")
    for name in builds:
        print(
            f"  {name:<9}: engine {statistics.median(engine[name]):>12,.0f} simulated req/s; "
            f"capacity --rps 10000 {statistics.median(walls[name]):.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-python", help="interpreter of another installed build to compare with")
    parser.add_argument("--fast-seconds", type=float, default=600.0, help="simulated seconds for the fast engine")
    parser.add_argument("--naive-seconds", type=float, default=10.0, help="simulated seconds for the naive model")
    args = parser.parse_args()

    model = ServiceModel()
    rps, gpus = 10_000, 16
    rng = np.random.default_rng(0)
    fast_arr = generate_arrivals(RateSchedule(rps=rps), args.fast_seconds, model.tier_shares, rng)
    naive_arr = generate_arrivals(RateSchedule(rps=rps), args.naive_seconds, model.tier_shares, rng)

    fast_rates, naive_rates = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        fast_rates.append(len(fast_arr) / timed(lambda: simulate_arrivals(model, fast_arr, gpus)))
        naive_rates.append(len(naive_arr) / timed(lambda: simulate_reference(model, naive_arr, gpus)))
    fast, naive = statistics.median(fast_rates), statistics.median(naive_rates)

    cli = [sys.executable, "-m", "infer_plan.cli", "capacity", "--rps", "10000", "--json"]
    capacity_walls = [timed(lambda: subprocess.run(cli, check=True, capture_output=True)) for _ in range(args.repeats)]

    print(f"scenario: {rps:,} req/s, tiers 10/30/60, {gpus} GPUs, {args.repeats} repeats (medians)")
    print(
        f"batch-level engine : {fast:>12,.0f} simulated req/s  ({len(fast_arr):,} requests, "
        f"{args.fast_seconds:g} s simulated)"
    )
    print(f"per-request SimPy  : {naive:>12,.0f} simulated req/s  ({len(naive_arr):,} requests)")
    print(f"speed-up           : {fast / naive:>12.1f} x")
    print(
        f"capacity --rps 10000 wall time: {statistics.median(capacity_walls):.2f} s "
        f"(runs: {', '.join(f'{w:.2f}' for w in capacity_walls)})"
    )
    if args.baseline_python:
        compare_builds({"this": sys.executable, "baseline": args.baseline_python}, args.repeats, args.fast_seconds)


if __name__ == "__main__":
    main()
