"""Drain on SIGTERM during steady load: nothing accepted is lost, newcomers get 503 + Retry-After."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.server.backends.sim_gpu import sim_output
from infer_plan.sim import RateSchedule
from infer_plan.sim.inputs.arrivals import generate_arrivals

from tests.helpers import DEV_KEYS, running_server

DRAIN_TIMEOUT_S = 20.0


@pytest.mark.timeout(120)
async def test_sigterm_drains_queued_work_and_refuses_newcomers_with_retry_after():
    # One GPU with a 1 s kernel: when the signal comes, a batch runs and another is queued.
    with running_server("--gpus", "1", "--kernel-ms", "1000", "--drain-timeout", str(DRAIN_TIMEOUT_S)) as srv:
        arr = generate_arrivals(RateSchedule(rps=60), 4.0, ServiceModel().tier_shares, np.random.default_rng(5))
        sender = asyncio.create_task(send_open_loop(srv.url, arr, DEV_KEYS, timeout_s=30))
        await asyncio.sleep(2.0)
        srv.proc.send_signal(15)
        signalled = time.monotonic()
        await asyncio.sleep(0.1)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{srv.url}/v1/inference",
                json={"model": "sim", "input": "late"},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp,
        ):
            late_status, late_body, retry_after = resp.status, await resp.json(), resp.headers.get("Retry-After")
        result = await sender
        code = await asyncio.to_thread(srv.proc.wait, DRAIN_TIMEOUT_S + 10)
        exited_after = time.monotonic() - signalled

    assert code == 0
    assert exited_after < DRAIN_TIMEOUT_S
    assert late_status == 503 and late_body["error"]["code"] == "draining" and retry_after is not None
    before = result.records.sent < 2.0 - 0.05
    assert before.sum() > 80
    assert (result.records.status[before] == 200).all(), np.unique(result.records.status[before], return_counts=True)
    assert ((result.records.finished > 2.0) & (result.records.status == 200)).any()  # the drain finished queued work
    served = np.flatnonzero(result.records.status == 200)
    assert all(result.outputs[i] == sim_output(result.inputs[i]) for i in served)
    # Requests that reached a listener after the signal were refused, not queued and lost.
    assert set(np.unique(result.records.status[~before])) <= {200, 503, 0}
