"""Simulator speed: batch-level engine vs the per-request SimPy model, and capacity's wall time.

Run: python benchmarks/bench_sim.py [--repeats 3]
Prints medians of side-by-side runs in one process (shared machines are noisy).
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
from infer_plan.sim.arrivals import generate_arrivals
from infer_plan.sim.engine import simulate_arrivals
from infer_plan.sim.reference import simulate_reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
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


if __name__ == "__main__":
    main()
