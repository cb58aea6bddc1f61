"""Token-level simulator speed: continuous batching beside static batching with tokens, and the reference.

Run: python benchmarks/bench_tokens.py [--repeats 3] [--seconds 600]
The workload of issue #15: 1,000 req/s, 512-token prompts, 128-token outputs, 10
simulated minutes, the BLIS step coefficients of the example profile
(examples/profiles/llama-3.1-8b-instruct-h100.toml) on a fleet that serves it (18 GPUs,
the capacity answer), and static batching of the same requests on the fleet its own
plan needs. Both modes are timed in rotation and the medians printed; the step-by-step
reference runs a short window once, for the speed-up. Continuous batching runs twice:
its compiled loop (the default where it applies, sim/engines/step_kernel.py) and the
interpreted engine it is held to. Targets: continuous >= 1M simulated requests per
wall-second (issue #32; the interpreted engine's was 200k, issue #15), static with
tokens >= 2M. Two rows with prefix caching run the same requests behind one of 8 shared
system prompts of 1,024 tokens (Zipf 1.1), compiled and interpreted, target >= 150k
(issue #30).

A static batch costs the engine a fixed amount of work whatever its size, and at 1,000
req/s on 30 GPUs batches hold about 41 requests, so the static figure is also printed
for the same requests without tokens (the dispatcher's own floor at these batch sizes)
and for 10,000 req/s, where batches fill to 100.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from infer_plan.core.model import Batching
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals
from infer_plan.sim.inputs.shared_prefix import SharedPrefixSpec
from infer_plan.sim.references.step_reference import simulate_steps_reference
from infer_plan.sim.scenario import load_scenario

PROFILE = Path(__file__).parents[1] / "examples/profiles/llama-3.1-8b-instruct-h100.toml"
FLEETS = {"continuous": 18, "static": 30}  # each mode's capacity answer for this workload
FULL_BATCHES = (10_000, 170)  # req/s and the GPUs that serve it with static batches of 100


def workload(seconds: float, shares: tuple[float, ...], rps: float = 1000) -> Arrivals:
    arr = generate_arrivals(RateSchedule(rps=rps), seconds, shares, np.random.default_rng(0))
    n = len(arr)
    return Arrivals(arr.times, arr.tiers, np.full(n, 512, np.int32), np.full(n, 128, np.int32))


def behind_system_prompts(arrivals: Arrivals) -> Arrivals:
    """The same requests, each after one of 8 shared system prompts of 1,024 tokens (Zipf 1.1)."""
    shared = SharedPrefixSpec(tokens=1024, count=8, zipf=1.1)
    prompts = arrivals.prompt_tokens + shared.tokens  # type: ignore[operator]
    return arrivals.with_lengths(prompts, arrivals.output_tokens, shared.draw(len(arrivals), np.random.default_rng(1)))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=600.0, help="simulated seconds")
    parser.add_argument("--reference-seconds", type=float, default=20.0)
    args = parser.parse_args()

    base = load_scenario(None, PROFILE).model
    arrivals = workload(args.seconds, base.tier_shares)
    rps, gpus = FULL_BATCHES
    full = workload(args.seconds / 5, base.tier_shares, rps)
    no_tokens = base.model_copy(update={"decode_step_ms": 0.0, "prefill_ms_per_token": 0.0, "decode_ms_per_seq": 0.0})
    cached, shared = base.model_copy(update={"prefix_caching": True}), behind_system_prompts(arrivals)
    runs = {  # name: (model, arrivals, GPUs, compiled loop)
        "continuous": (base, arrivals, FLEETS["continuous"], True),
        "continuous, interpreted": (base, arrivals, FLEETS["continuous"], False),
        "continuous, prefix cache": (cached, shared, FLEETS["continuous"], True),
        "prefix cache, interpreted": (cached, shared, FLEETS["continuous"], False),
        "static": (base.model_copy(update={"batching": Batching.STATIC}), arrivals, FLEETS["static"], None),
        "static, no tokens": (no_tokens.model_copy(update={"batching": Batching.STATIC, "kernel_ms": 100.0}),
                              Arrivals(arrivals.times, arrivals.tiers), FLEETS["static"], None),
        f"static at {rps:,} req/s": (base.model_copy(update={"batching": Batching.STATIC}), full, gpus, None),
    }  # fmt: skip
    simulate_arrivals(base, workload(1.0, base.tier_shares), 1, compiled=True)  # numba's compile or cache load, once
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, arr, fleet, compiled) in runs.items():
            start = time.perf_counter()
            out = simulate_arrivals(model, arr, fleet, compiled=compiled)
            rates[name].append(len(arr) / (time.perf_counter() - start))
            assert out.records.ok.mean() > 0.99, f"{name}: the fleet must serve the load"
    print(f"1,000 req/s, 512/128 tokens, {args.seconds:g} simulated s ({len(arrivals):,} requests), "
          f"medians of {args.repeats} in rotation:")  # fmt: skip
    for name, (_, arr, fleet, _) in runs.items():
        print(f"  {name:<26} {fleet:>3} GPUs, {len(arr):>9,} requests: "
              f"{statistics.median(rates[name]):>12,.0f} simulated req/s")  # fmt: skip

    short = workload(args.reference_seconds, base.tier_shares)
    start = time.perf_counter()
    simulate_steps_reference(
        base, short.times, short.tiers, short.prompt_tokens, short.output_tokens, FLEETS["continuous"]
    )
    reference = len(short) / (time.perf_counter() - start)
    fast, interpreted = statistics.median(rates["continuous"]), statistics.median(rates["continuous, interpreted"])
    print(f"  step-by-step reference ({args.reference_seconds:g} s of continuous): {reference:,.0f} simulated req/s; "
          f"the interpreted engine is {interpreted / reference:.0f}x faster, the compiled loop "
          f"{fast / interpreted:.1f}x the interpreted engine")  # fmt: skip


if __name__ == "__main__":
    main()
