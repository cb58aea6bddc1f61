"""A minimal open-loop HTTP sender: each request leaves at its scheduled time, answered or not.

Latency is measured from the *scheduled* send time as well as the actual one, so a
lagging sender or an overloaded server cannot hide delay (coordinated omission). The
Locust harness is the product's load generator; this plain aiohttp sender is what
tests and benchmarks use where they need exact per-request latencies on a known
arrival sequence (the same one the simulator is fed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from ..sim.arrivals import Arrivals
from .plan import Records

__all__ = ["OpenLoopResult", "send_open_loop"]


@dataclass
class OpenLoopResult(Records):
    """Records plus what each request sent and got back."""

    outputs: list[str | None] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


async def send_open_loop(
    url: str,
    arrivals: Arrivals,
    keys: dict[int, str],
    *,
    model: str = "sim",
    input_prefix: str = "req",
    timeout_s: float = 60.0,
) -> OpenLoopResult:
    """POST one inference per arrival at its scheduled offset from now; bounded by the arrivals."""
    n = len(arrivals)
    sent = np.full(n, np.nan)
    finished = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    outputs: list[str | None] = [None] * n
    inputs = [f"{input_prefix}-{i}" for i in range(n)]
    endpoint = f"{url}/v1/inference"
    headers = [{"Authorization": f"Bearer {keys[int(t)]}"} for t in arrivals.tiers]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, start: float) -> None:
            sent[i] = time.perf_counter() - start
            try:
                async with session.post(
                    endpoint, json={"model": model, "input": inputs[i]}, headers=headers[i]
                ) as resp:
                    body = await resp.json(content_type=None)
                    status[i] = resp.status
                    if resp.status == 200:
                        outputs[i] = body["output"]
            except (aiohttp.ClientError, TimeoutError, ValueError):
                status[i] = 0
            finished[i] = time.perf_counter() - start

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals.times):
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, start)))
        await asyncio.gather(*tasks)
    return OpenLoopResult(
        scheduled=arrivals.times.copy(),
        sent=sent,
        finished=finished,
        status=status,
        outputs=outputs,
        inputs=inputs,
        tiers=arrivals.tiers.copy(),
        wrong_output=np.zeros(n, dtype=bool),
    )
