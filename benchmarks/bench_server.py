"""Server overhead: throughput at zero GPU time vs a bare aiohttp handler, and added latency.

Run: python benchmarks/bench_server.py [--repeats 3] [--seconds 8] [--baseline-python PATH]
Needs `wrk` (Debian package). Each server is pinned to core 0 and wrk to core 1; the
servers alternate within each repeat and medians are printed. Measured: a bare aiohttp
handler, `serve` with its default JSON access log (written to a file, as in production),
and `serve --no-access-log`. With ``--baseline-python`` (the interpreter of another
installed build, e.g. the previous release's virtual environment) that build's two
`serve` variants run in the same rotation, so the builds are compared side by side.
Targets: throughput >= 50% of the bare handler (issue #3); the access log keeps >= 75%
of the throughput without it (issue #14); server-added P95 latency at 1,000 req/s
<= 5 ms over the model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from infer_plan.core import ServiceModel
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import generate_arrivals

HERE = Path(__file__).parent
LUA = (
    'wrk.method = "POST"\nwrk.body = \'{"model": "sim", "input": "hello"}\'\n'
    'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer dev-enterprise"\n'
)
ZERO_GPU = "[service]\npcie_in_ms = 0\nkernel_ms = 0\npcie_out_ms = 0\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def wrk_rps(
    port: int,
    seconds: int,
    script: Path,
    pin: bool = True,
    threads: int = 1,
    connections: int = 128,
    path: str = "/v1/inference",
) -> float:
    """Requests/s wrk reached; any non-2xx answer is an error. ``pin``: wrk on core 1."""
    out = subprocess.run(
        [
            *(["taskset", "-c", "1"] if pin else []),
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stdout}{out.stderr}")
    out = out.stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def run_pinned(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as sink:  # the access log goes to a file, as a deployment's would
        return subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=subprocess.DEVNULL, stderr=sink)


def servers(python: str, label: str, scenario: Path) -> dict[str, list[str]]:
    serve = [python, "-m", "infer_plan.cli", "serve", "--gpus", "4", "--internal-port", "0"]
    serve += ["--scenario", str(scenario)]
    return {f"{label}serve (access log)": serve, f"{label}serve --no-access-log": [*serve, "--no-access-log"]}


def throughput(repeats: int, seconds: int, tmp: Path, baseline: str | None) -> dict[str, float]:
    """Median req/s of each server, measured in rotation."""
    script = tmp / "post.lua"
    script.write_text(LUA)
    scenario = tmp / "zero.toml"
    scenario.write_text(ZERO_GPU)
    commands = {"bare aiohttp handler": [sys.executable, str(HERE / "bare_server.py")]}
    commands |= servers(sys.executable, "", scenario)
    if baseline:
        commands |= servers(baseline, "baseline ", scenario)
    rates: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            port = free_port()
            log = tmp / "server.log"
            proc = run_pinned([*cmd, str(port)] if "bare" in name else [*cmd, "--port", str(port)], log)
            try:
                try:
                    wait_listening(port)
                except RuntimeError as err:
                    raise RuntimeError(f"{name}: {err}; its log ends: {log.read_text()[-1500:]}") from None
                wrk_rps(port, 1, script)  # warm-up
                rates[name].append(wrk_rps(port, seconds, script))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return {name: statistics.median(values) for name, values in rates.items()}


async def added_latency(rps: float, seconds: float, gpus: int) -> tuple[float, float, float]:
    model = ServiceModel()
    arr = generate_arrivals(RateSchedule(rps=rps), seconds, model.tier_shares, np.random.default_rng(11))
    port = free_port()
    proc = run_pinned(
        [sys.executable, "-m", "infer_plan.cli", "serve", "--no-access-log", "--gpus", str(gpus), "--port", str(port)],
        Path(os.devnull),
    )
    try:
        wait_listening(port)
        keys = {0: "dev-enterprise", 1: "dev-paid", 2: "dev-free"}
        result = await send_open_loop(f"http://127.0.0.1:{port}", arr, keys)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    predicted = simulate_arrivals(model, arr, gpus).records.latency_ms
    warm = arr.times >= 1.0
    ok = result.records.status[warm] == 200
    measured = result.records.latency_ms[warm][ok]
    return float(np.percentile(measured, 95)), float(np.percentile(predicted[warm], 95)), float(ok.mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--baseline-python", help="interpreter of another installed build to compare with")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("needs wrk and taskset (apt-get install wrk util-linux)")
    print(f"machine: {os.cpu_count()} cores; servers pinned to core 0, load generator to core 1")
    with tempfile.TemporaryDirectory() as tmp:
        rates = throughput(args.repeats, args.seconds, Path(tmp), args.baseline_python)
    bare = rates["bare aiohttp handler"]
    print(f"throughput at GPU time 0, medians of {args.repeats} (each server in rotation):")
    for name, rate in rates.items():
        print(f"  {name:<38}: {rate:>9,.0f} req/s  {rate / bare:>5.0%} of bare")
    for label in ("", "baseline ") if args.baseline_python else ("",):
        logged, quiet = rates[f"{label}serve (access log)"], rates[f"{label}serve --no-access-log"]
        print(f"  {label or 'this build '}access log keeps {logged / quiet:.0%} of the throughput without it")
    p95_measured, p95_model, ok = asyncio.run(added_latency(1000, 10, gpus=2))
    print(
        f"1,000 req/s open loop, 2 GPUs: P95 measured {p95_measured:.1f} ms, simulator {p95_model:.1f} ms, "
        f"server-added {p95_measured - p95_model:+.1f} ms ({ok:.1%} answered 200)"
    )


if __name__ == "__main__":
    main()
