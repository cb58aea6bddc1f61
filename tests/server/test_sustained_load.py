"""Overload at 3x capacity for 60 s and a 10-minute soak at 70%: the slow reliability tests.

Both run the sim backend with a small fleet (1 GPU, batches of 20: 182 req/s at full
batches) so a Python sender on the same 2 cores can offer 3x capacity. The server's
RSS and open file descriptors are sampled with psutil while the load runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import psutil
import pytest
from infer_plan.core import ServiceModel, Tier
from infer_plan.loadtests.openloop import OpenLoopResult, send_open_loop
from infer_plan.loadtests.target import write_model_scenario
from infer_plan.server.backends.sim_gpu import sim_output
from infer_plan.sim import RateSchedule
from infer_plan.sim.inputs.arrivals import generate_arrivals

from tests.helpers import DEV_KEYS, running_server

pytestmark = pytest.mark.slow

SMALL_FLEET = ServiceModel(max_batch=20, gpus=1)
CAPACITY_RPS = SMALL_FLEET.per_gpu_rps()


class Sampler:
    """RSS, open fds and queue depth of the server every ``every_s`` seconds."""

    def __init__(self, pid: int, url: str, every_s: float) -> None:
        self.proc = psutil.Process(pid)
        self.url = url
        self.every_s = every_s
        self.t: list[float] = []
        self.rss_mb: list[float] = []
        self.fds: list[int] = []
        self.queued: list[int] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with aiohttp.ClientSession() as session:
            while True:
                self.t.append(loop.time() - start)
                self.rss_mb.append(self.proc.memory_info().rss / 2**20)
                self.fds.append(self.proc.num_fds())
                async with session.get(f"{self.url}/readyz") as resp:
                    self.queued.append((await resp.json())["queued"])
                await asyncio.sleep(self.every_s)

    def slope_per_min(self, values: list[float], after_s: float) -> float:
        t = np.asarray(self.t)
        keep = t >= after_s
        return float(np.polyfit(t[keep] / 60.0, np.asarray(values, dtype=float)[keep], 1)[0])


@contextlib.asynccontextmanager
async def sampling(server, every_s: float) -> AsyncIterator[Sampler]:
    sampler = Sampler(server.pid, server.url, every_s)
    task = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def p95_ms(result: OpenLoopResult, mask: np.ndarray) -> float:
    latency = (result.records.finished - result.records.scheduled)[mask & (result.records.status == 200)]
    return float(np.percentile(latency, 95) * 1000.0)


def assert_all_answered_correctly(result: OpenLoopResult) -> None:
    assert set(np.unique(result.records.status)) <= {200, 429}, np.unique(result.records.status, return_counts=True)
    ok = np.flatnonzero(result.records.status == 200)
    assert all(result.outputs[i] == sim_output(result.inputs[i]) for i in ok)


@pytest.mark.timeout(300)
async def test_three_times_capacity_for_a_minute(tmp_path):
    scenario = write_model_scenario(SMALL_FLEET, tmp_path / "model.toml")
    limit = SMALL_FLEET.backpressure.thresholds(1, SMALL_FLEET.max_batch)[2]
    with running_server("--scenario", str(scenario)) as srv:
        arr = generate_arrivals(
            RateSchedule(rps=3 * CAPACITY_RPS), 60.0, SMALL_FLEET.tier_shares, np.random.default_rng(3)
        )
        async with sampling(srv, every_s=1.0) as sampler:
            result = await send_open_loop(srv.url, arr, DEV_KEYS, timeout_s=60)
        assert srv.terminate() == 0

    assert_all_answered_correctly(result)
    shed = {t: (result.records.status[result.records.tier == t] == 429).mean() for t in Tier}
    first_429 = float(result.records.scheduled[np.argmax(result.records.status == 429)])
    enterprise_p95 = p95_ms(result, result.records.tier == Tier.ENTERPRISE)
    growth = max(sampler.rss_mb) - sampler.rss_mb[min(5, len(sampler.rss_mb) - 1)]
    print(
        f"\noverload: {len(result.records.status)} requests at {3 * CAPACITY_RPS:.0f} req/s for 60 s; "
        f"200: {(result.records.status == 200).sum()}, 429: {(result.records.status == 429).sum()}, lost: 0; "
        f"shed enterprise/paid/free {shed[Tier.ENTERPRISE]:.1%}/{shed[Tier.PAID]:.1%}/{shed[Tier.FREE]:.1%}; "
        f"first 429 at {first_429:.2f} s; enterprise P95 {enterprise_p95:.0f} ms; "
        f"max queued {max(sampler.queued)} (limit {limit}); RSS {sampler.rss_mb[0]:.0f} -> {max(sampler.rss_mb):.0f} MB"
    )
    assert first_429 < 2.0  # shedding starts within the first seconds, not after a backlog built up
    assert result.records.tier[np.argmax(result.records.status == 429)] == Tier.FREE
    assert shed[Tier.FREE] > shed[Tier.PAID] >= shed[Tier.ENTERPRISE]
    assert shed[Tier.ENTERPRISE] < 0.01
    assert enterprise_p95 < 500.0
    assert max(sampler.queued) <= limit
    assert growth < 30.0  # MB after the first seconds: queue limits hold memory


@pytest.mark.timeout(900)
async def test_soak_ten_minutes_at_seventy_percent(tmp_path):
    scenario = write_model_scenario(SMALL_FLEET, tmp_path / "model.toml")
    rate = 0.7 * CAPACITY_RPS
    minutes = 10
    rng = np.random.default_rng(7)
    p95_by_minute, shed_by_minute, answered = [], [], 0
    with running_server("--scenario", str(scenario)) as srv:
        async with sampling(srv, every_s=5.0) as sampler:
            for minute in range(minutes):  # one bounded chunk of arrivals per minute
                arr = generate_arrivals(RateSchedule(rps=rate), 60.0, SMALL_FLEET.tier_shares, rng)
                result = await send_open_loop(srv.url, arr, DEV_KEYS, input_prefix=f"m{minute}", timeout_s=60)
                assert_all_answered_correctly(result)
                statuses = result.records.status
                # At 70% nothing should be shed (the simulator sheds none of these arrivals in any minute). A stall of
                # the shared 2-core machine holds the server's loop, and the requests sent meanwhile reach it as one
                # burst that crosses the yellow zone: shedding free-tier requests then is the specified behaviour
                # (16 and 26 429s in a minute's ~7,700 on 2026-11-24, 43 on a CI run on 2026-12-07). So sheds must
                # be free-tier, under 2% in any minute and 0.5% over the soak: a server that degrades as it runs
                # sheds more every minute.
                shed = statuses != 200
                counts = dict(zip(*np.unique(statuses, return_counts=True), strict=True))
                assert shed.mean() <= 0.02 and (result.records.tier[shed] == Tier.FREE).all(), counts
                shed_by_minute.append(int(shed.sum()))
                answered += len(result.records.status)
                p95_by_minute.append(p95_ms(result, np.ones(len(result.records.status), dtype=bool)))
        await asyncio.sleep(1.0)  # the sender's connections are closed; the server's sockets go with them
        fds_after = psutil.Process(srv.pid).num_fds()
        assert srv.terminate() == 0

    rss_slope = sampler.slope_per_min(sampler.rss_mb, after_s=60.0)
    fd_slope = sampler.slope_per_min(sampler.fds, after_s=60.0)
    spread = (max(p95_by_minute) - min(p95_by_minute)) / float(np.median(p95_by_minute))
    print(
        f"\nsoak: {answered} requests over {minutes} min at {rate:.0f} req/s, "
        f"RSS {sampler.rss_mb[0]:.1f} -> {sampler.rss_mb[-1]:.1f} MB (slope {rss_slope:+.3f} MB/min after minute 1); "
        f"fds {sampler.fds[0]} before, {min(sampler.fds[1:])}-{max(sampler.fds)} under load "
        f"(slope {fd_slope:+.3f}/min), {fds_after} after; "
        f"P95 by minute {', '.join(f'{p:.0f}' for p in p95_by_minute)} ms (spread {spread:.1%}); "
        f"free-tier 429s by minute {', '.join(map(str, shed_by_minute))}"
    )
    assert sum(shed_by_minute) <= 0.005 * answered
    assert abs(rss_slope) < 1.0  # MB per minute
    # Under load the count follows the client's keep-alive pool (47-77 seen, a slope of +1.3/min once on CI);
    # a leak of one fd per request would climb ~7,600/min. Once the pool closes, nothing may be left over.
    assert abs(fd_slope) < 3.0
    assert fds_after <= sampler.fds[0] + 3
    assert spread < 0.25
