"""Planning at internet scale: `infer-plan capacity --rps R` wall time and peak memory, R up to a million.

Run: python benchmarks/bench_scale.py [--rates 10000,100000,1000000] [--repeats 3] [--jobs N]
                                      [--modes static,continuous] [--baseline EXE] [--baseline-timeout S]
Each run is a fresh `infer-plan capacity --rps R --json` process; its memory is the
peak of the summed RSS of the process and its worker processes, sampled every 20 ms
(psutil). Prints the median wall time and peak RSS per rate, the answer, the
back-of-envelope count and how long the chosen run measured. Two modes: the design's
static batch cycle (the default service model) and continuous batching (the example
LLM profile, examples/profiles/llama-3.1-8b-instruct-h100.toml). ``--baseline EXE``
runs another build's infer-plan (e.g. a worktree of the commit before) in rotation
with this one, side by side; a run it refuses or that passes ``--baseline-timeout`` is
reported as such.
Targets: static (issue #18) 1,000,000 req/s under 30 s and 2 GB on a 2-core machine,
10,000 under 2 s; continuous (issue #32) 1,000,000 under 60 s and 2 GB, 100,000 under
15 s, 10,000 under 3 s.
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


PROFILE = Path(__file__).parents[1] / "examples/profiles/llama-3.1-8b-instruct-h100.toml"


def one_run(exe: str, rps: float, mode: str, jobs: int | None, timeout: float) -> tuple[float, int, dict | str]:
    """Wall time, peak RSS and the plan (or why there is none: the exit code and message, or the timeout)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [exe, "capacity", "--rps", f"{rps:g}", "--quiet", "--save", str(out)]
        cmd += ["--profile", str(PROFILE)] if mode == "continuous" else []
        cmd += ["--jobs", str(jobs)] if jobs else []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(watched))
            if time.perf_counter() - start > timeout:
                for child in watched.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                proc.kill()
                proc.wait()
                return time.perf_counter() - start, peak, f"stopped after {timeout:g} s"
            time.sleep(0.02)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return wall, peak, f"exit {proc.returncode}: {proc.stderr.read().strip()[:100]}"
        return wall, peak, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None, help="passed to capacity (default: its own, the cores)")
    parser.add_argument("--modes", default="static,continuous")
    parser.add_argument("--baseline", default=None, help="another build's infer-plan executable, run beside this one")
    parser.add_argument("--baseline-timeout", type=float, default=600.0)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    exe = shutil.which("infer-plan") or str(Path(sys.executable).with_name("infer-plan"))
    builds = {"this": exe} | ({"baseline": args.baseline} if args.baseline else {})
    print(f"{psutil.cpu_count()} cores; median of {args.repeats} fresh processes per rate, builds in rotation")
    header = ("mode", 10), ("build", 8), ("rps", 10), ("wall s", 8), ("peak MB", 8), ("GPUs", 6), ("envelope", 9), \
        ("P95 ms", 8), ("measured s", 10)  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'sims':>5}")
    for mode in args.modes.split(","):
        for rps in rates:
            runs: dict[str, list] = {name: [] for name in builds}
            for _ in range(args.repeats):
                for name, path in builds.items():
                    timeout = args.baseline_timeout if name == "baseline" else 3600.0
                    runs[name].append(one_run(path, rps, mode, args.jobs, timeout))
            for name, done in runs.items():
                walls, peaks, plan = [r[0] for r in done], [r[1] for r in done], done[-1][2]
                lead = f"{mode:>10} {name:>8} {rps:>10,.0f} {statistics.median(walls):>8.2f} "
                lead += f"{statistics.median(peaks) / 1e6:>8.0f}"
                if isinstance(plan, str):
                    print(f"{lead} {plan}")
                    continue
                measured = (plan.get("precision") or {}).get("measured_s", plan["duration_s"])
                print(
                    f"{lead} {plan['gpus']:>6} {plan['back_of_envelope']['gpus_at_ceiling']:>9} {plan['p95_ms']:>8.1f} "
                    f"{measured:>10.4g} {plan['simulations']:>5}"
                )


if __name__ == "__main__":
    main()
