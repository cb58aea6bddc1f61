"""Streaming overhead: streamed req/s and chunks/s at zero GPU time beside a bare SSE handler, and added TTFT.

Run: python benchmarks/bench_streaming.py [--repeats 3] [--seconds 8] [--tokens 16]
Needs `wrk` and `taskset`. Each server is pinned to core 0 and the load generator to
core 1; the two servers alternate within each repeat and medians are printed.
Targets (issue "The reference server speaks OpenAI"): streamed req/s >= 50% of the
bare aiohttp SSE handler's; server-added TTFT P95 at 500 streaming req/s <= 5 ms.

At zero GPU time the model's TTFT is 0 (no assembly wait, no steps), so the TTFT a
client measures is all overhead: the gateway, the queue, the GPU worker, the stream's
first write and the client itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from bench_server import HERE, free_port, run_pinned, wait_listening, wrk_rps

ZERO_GPU_TOKENS = "[service]\npcie_in_ms = 0\nkernel_ms = 0\npcie_out_ms = 0\nmax_wait_ms = 0\n"


def lua(tokens: int) -> str:
    body = json.dumps({"model": "sim", "prompt": "hello world", "max_tokens": tokens, "stream": True})
    return (
        f"wrk.method = \"POST\"\nwrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer dev-enterprise"\n'
    )


def throughput(repeats: int, seconds: int, tokens: int, tmp: Path) -> dict[str, float]:
    script = tmp / "stream.lua"
    script.write_text(lua(tokens))
    scenario = tmp / "zero.toml"
    scenario.write_text(ZERO_GPU_TOKENS)
    serve = [sys.executable, "-m", "infer_plan.cli", "serve", "--gpus", "4", "--internal-port", "0", "--no-access-log"]
    commands = {
        "bare aiohttp SSE handler": [sys.executable, str(HERE / "bare_sse_server.py")],
        "serve --no-access-log": [*serve, "--scenario", str(scenario)],
    }
    rates: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            port = free_port()
            proc = run_pinned([*cmd, str(port)] if "bare" in name else [*cmd, "--port", str(port)], tmp / "log")
            try:
                wait_listening(port)
                wrk_rps(port, 1, script, path="/v1/completions")  # warm-up
                rates[name].append(wrk_rps(port, seconds, script, path="/v1/completions"))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return {name: statistics.median(values) for name, values in rates.items()}


async def streamed_ttft(rps: float, seconds: float, tokens: int, tmp: Path) -> tuple[np.ndarray, float]:
    """TTFT of each streamed request sent open loop at ``rps`` (after 1 s of warm-up), and the share completed."""
    scenario = tmp / "zero.toml"
    scenario.write_text(ZERO_GPU_TOKENS)
    port = free_port()
    cmd = [sys.executable, "-m", "infer_plan.cli", "serve", "--gpus", "4", "--internal-port", "0", "--no-access-log"]
    proc = run_pinned([*cmd, "--scenario", str(scenario), "--port", str(port)], tmp / "log")
    body = {"model": "sim", "prompt": "hello world", "max_tokens": tokens, "stream": True}
    headers = {"Authorization": "Bearer dev-enterprise"}
    count = int(rps * seconds)
    ttfts = np.full(count, np.nan)
    try:
        wait_listening(port)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter()

            async def one(i: int) -> None:
                await asyncio.sleep(max(0.0, i / rps - (time.perf_counter() - start)))
                sent = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=headers) as resp:
                    if resp.status != 200:
                        return
                    await resp.content.readuntil(b"\n\n")
                    ttfts[i] = time.perf_counter() - sent
                    await resp.read()

            await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    warm = ttfts[int(rps) :]
    return warm[~np.isnan(warm)] * 1000.0, float(np.mean(~np.isnan(warm)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per streamed answer")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("needs wrk and taskset (apt-get install wrk util-linux)")
    print(f"machine: {os.cpu_count()} cores; servers pinned to core 0, load generator to core 1")
    with tempfile.TemporaryDirectory() as tmp:
        rates = throughput(args.repeats, args.seconds, args.tokens, Path(tmp))
        bare = rates["bare aiohttp SSE handler"]
        print(f"streamed completions of {args.tokens} tokens at GPU time 0, medians of {args.repeats} in rotation:")
        for name, rate in rates.items():
            print(
                f"  {name:<26}: {rate:>8,.0f} req/s {rate * args.tokens:>10,.0f} chunks/s  {rate / bare:>5.0%} of bare"
            )
        ttft, ok = asyncio.run(streamed_ttft(500, 10, args.tokens, Path(tmp)))
        p50, p95 = np.percentile(ttft, [50, 95])
        print(
            f"500 streamed req/s open loop, 4 GPUs at GPU time 0 (model TTFT 0): TTFT P50 {p50:.2f} ms, "
            f"P95 {p95:.2f} ms, all server-added and client overhead ({ok:.1%} completed)"
        )


if __name__ == "__main__":
    main()
