"""Planning at internet scale: `infer-plan capacity --rps R` wall time and peak memory, R up to a million.

Run: python benchmarks/bench_scale.py [--rates 10000,100000,1000000] [--repeats 3] [--jobs N]
Each run is a fresh `infer-plan capacity --rps R --json` process; its memory is the
peak of the summed RSS of the process and its worker processes, sampled every 20 ms
(psutil). Prints the median wall time and peak RSS per rate, the answer, the
back-of-envelope count and how long the chosen run measured.
Targets (issue #18): 1,000,000 req/s under 30 s and 2 GB on a 2-core machine, the
same answer as the back-of-envelope where the load ceiling binds; 10,000 under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (the planner's worker processes)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def one_run(rps: float, jobs: int | None) -> tuple[float, int, dict]:
    exe = shutil.which("infer-plan") or str(Path(sys.executable).with_name("infer-plan"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [exe, "capacity", "--rps", f"{rps:g}", "--quiet", "--save", str(out)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(watched))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"capacity --rps {rps:g} exited {proc.returncode}: {proc.stderr.read()}")
        return wall, peak, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="passed to capacity (default: its own, the cores)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(f"{psutil.cpu_count()} cores; median of {args.repeats} fresh processes per rate")
    header = ("rps", 10), ("wall s", 8), ("peak MB", 8), ("GPUs", 6), ("envelope", 9), ("P95 ms", 8), ("measured s", 10)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'sims':>5}")
    for rps in rates:
        runs = [one_run(rps, args.jobs) for _ in range(args.repeats)]
        walls, peaks = [r[0] for r in runs], [r[1] for r in runs]
        plan = runs[-1][2]
        precision = plan.get("precision") or {}
        print(
            f"{rps:>10,.0f} {statistics.median(walls):>8.2f} {statistics.median(peaks) / 1e6:>8.0f} "
            f"{plan['gpus']:>6} {plan['back_of_envelope']['gpus_at_ceiling']:>9} {plan['p95_ms']:>8.1f} "
            f"{precision.get('measured_s', plan['duration_s']):>10.4g} {plan['simulations']:>5}"
        )
        each = f"walls {', '.join(f'{w:.2f}' for w in walls)}; peaks MB {', '.join(f'{p / 1e6:.0f}' for p in peaks)}"
        print(f"{'':>10} {each}")


if __name__ == "__main__":
    main()
