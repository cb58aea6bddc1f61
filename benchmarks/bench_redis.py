"""Scale-out through Redis: throughput of 1 vs 2 instances, and the latency the Redis path adds.

Run: python benchmarks/bench_redis.py [--repeats 3] [--seconds 8]
Needs `wrk` and `redis-server` (Debian packages). Nothing is pinned: on a 2-core machine
the instances, Redis and wrk share both cores, which is the honest set-up for "does a
second process help here". Configurations alternate within each repeat; medians are
printed. Targets (issue #7): a figure for 1 vs 2 instances with the sim backend at GPU
time 0, and the Redis path's added P95 over the in-memory queue at the same arrivals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from bench_server import LUA, ZERO_GPU, free_port, wait_listening, wrk_rps
from infer_plan.core import ServiceModel
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.loadtests.target import RedisProcess, redis_server
from infer_plan.sim import RateSchedule
from infer_plan.sim.inputs.arrivals import generate_arrivals

KEYS = {0: "dev-enterprise", 1: "dev-paid", 2: "dev-free"}


@contextlib.contextmanager
def serving(*args: str) -> Iterator[int]:
    """A server on a free port; its log is printed if the run fails."""
    port = free_port()
    cmd = [sys.executable, "-m", "infer_plan.cli", "serve", "--no-access-log", "--port", str(port)]
    cmd += ["--internal-port", "0", *args]  # port + 1 may be some client's ephemeral port
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_listening(port)
            yield port
        except BaseException:
            log.seek(0)
            print(f"server log ({' '.join(args)}):\n{log.read()[-3000:]}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def throughput(redis: RedisProcess, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(LUA)
    scenario = tmp / "zero.toml"
    scenario.write_text(ZERO_GPU)
    configs = {"in-memory, 1 process": ["--gpus", "4"]}
    for n in args.instances:
        many = ["--instances", str(n)] if n > 1 else []
        configs[f"Redis, {n} instance{'s' if n > 1 else ''}"] = ["--gpus", "2", "--redis", redis.url, *many]
    runs: dict[str, list[float]] = {name: [] for name in configs}
    wrk = {"pin": False, "threads": args.wrk_threads, "connections": args.connections}
    for _ in range(args.repeats):
        for name, flags in configs.items():
            with serving(*flags, "--scenario", str(scenario)) as port:
                wrk_rps(port, 2, script, **wrk)  # warm-up: connections, every instance subscribed
                runs[name].append(wrk_rps(port, args.seconds, script, **wrk))
    return {name: statistics.median(r) for name, r in runs.items()}


async def latency(redis: RedisProcess, rps: float, seconds: float, repeats: int) -> dict[str, tuple[float, float]]:
    """P50 and P95 (ms) of the same arrivals through the in-memory queue and through Redis, alternated."""
    model = ServiceModel()
    arrivals = generate_arrivals(RateSchedule(rps=rps), seconds, model.tier_shares, np.random.default_rng(7))
    warm = arrivals.times >= 1.0
    configs = {
        "in-memory, 1 process": ["--gpus", "2"],
        "Redis, 1 instance": ["--gpus", "2", "--redis", redis.url],
        "Redis, 2 instances x 1 GPU": ["--gpus", "1", "--redis", redis.url, "--instances", "2"],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, args in configs.items():
            with serving(*args) as port:
                await asyncio.sleep(1.0)  # subscribed and heart-beating
                result = await send_open_loop(f"http://127.0.0.1:{port}", arrivals, KEYS)
            ok = result.records.status[warm] == 200
            if not ok.all():
                codes = dict(zip(*np.unique(result.records.status[warm], return_counts=True), strict=True))
                raise RuntimeError(f"{name}: {int((~ok).sum())} requests not answered 200 (status: count {codes})")
            measured = result.records.latency_ms[warm]
            runs[name].append((float(np.percentile(measured, 50)), float(np.percentile(measured, 95))))
    return {name: (statistics.median(p[0] for p in r), statistics.median(p[1] for p in r)) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rps", type=float, default=300, help="open-loop rate of the latency comparison")
    parser.add_argument("--instances", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2])
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--no-latency", action="store_true", help="throughput only")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("redis-server"):
        sys.exit("needs wrk and redis-server (apt-get install wrk redis-server)")
    print(f"machine: {os.cpu_count()} cores, nothing pinned (servers, Redis and wrk share them)")
    print(f"wrk: {args.wrk_threads} thread(s), {args.connections} connections; medians of {args.repeats}")
    with redis_server() as redis, tempfile.TemporaryDirectory() as tmp:
        rates = throughput(redis, args, Path(tmp))
        base, one = rates["in-memory, 1 process"], rates.get("Redis, 1 instance")
        for name, rate in rates.items():
            vs_one = f", {rate / one:.2f}x one instance" if one and name.startswith("Redis") else ""
            print(f"{name:<22} GPU 0 ms: {rate:>8,.0f} req/s  ({rate / base:.2f}x in-memory{vs_one})")
        if args.no_latency:
            return
        lat = asyncio.run(latency(redis, args.rps, args.seconds, args.repeats))
    print(f"{args.rps:g} req/s open loop, a pool of 2 GPUs, the same arrivals (medians of {args.repeats}):")
    p50_mem, p95_mem = lat["in-memory, 1 process"]
    for name, (p50, p95) in lat.items():
        added = f"  -> adds {p50 - p50_mem:+.1f} ms P50, {p95 - p95_mem:+.1f} ms P95" if p50 != p50_mem else ""
        print(f"  {name:<28} P50 {p50:6.1f} ms  P95 {p95:6.1f} ms{added}")


if __name__ == "__main__":
    main()
