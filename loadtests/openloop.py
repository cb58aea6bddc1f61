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
from dataclasses import dataclass

import aiohttp

from ..core.records import Outcome, RequestRecords
from ..sim.inputs.arrivals import Arrivals

__all__ = ["OpenLoopResult", "send_open_loop"]


@dataclass
class OpenLoopResult:
    """The request records, and what each request sent and got back."""

    records: RequestRecords
    inputs: list[str]
    outputs: list[str | None]


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
    records = RequestRecords.unanswered(arrivals.times, arrivals.tiers)
    outputs: list[str | None] = [None] * n
    inputs = [f"{input_prefix}-{i}" for i in range(n)]
    endpoint = f"{url}/v1/inference"
    headers = [{"Authorization": f"Bearer {keys[int(t)]}"} for t in arrivals.tiers]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, start: float) -> None:
            records.sent[i] = time.perf_counter() - start
            status = 0
            try:
                async with session.post(
                    endpoint, json={"model": model, "input": inputs[i]}, headers=headers[i]
                ) as resp:
                    body = await resp.json(content_type=None)
                    status = resp.status
                    if status == 200:
                        outputs[i] = body["output"]
            except (aiohttp.ClientError, TimeoutError, ValueError):
                status = 0
            records.finished[i] = time.perf_counter() - start
            records.status[i], records.outcome[i] = status, Outcome.of_answer(status)

        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals.times):
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, start)))
        await asyncio.gather(*tasks)
    return OpenLoopResult(records=records, inputs=inputs, outputs=outputs)
