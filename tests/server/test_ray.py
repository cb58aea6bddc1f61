"""GPU workers as Ray actors (``serve --backend ray``): a real local Ray, started and stopped by each test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import aiohttp
import numpy as np
import openai
import psutil
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.model import Backpressure
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.loadtests.target import redis_server, write_model_scenario
from infer_plan.server.backends.sim_gpu import sim_output, sim_words
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals

from tests.helpers import DEV_KEYS, RAY_ENV, ray_head, running_server

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

_RAY_NAMES = ("raylet", "gcs_server", "ray::")


def _ray_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            text = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
            if any(name in text for name in _RAY_NAMES):
                pids.add(proc.pid)
    return pids


_KILL = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
actor = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-gpu-" + sys.argv[2])][0]
ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
"""


async def _post(session: aiohttp.ClientSession, url: str, text: str, key: str = "dev-paid") -> tuple[int, dict]:
    body = {"model": "ray-sim", "input": text}
    async with session.post(f"{url}/v1/inference", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json(content_type=None)


def _mean_batch_ms(before: str, after: str) -> float:
    def value(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    total = value(after, "inferplan_batch_latency_seconds_sum") - value(before, "inferplan_batch_latency_seconds_sum")
    count = value(after, "inferplan_batch_latency_seconds_count") - value(
        before, "inferplan_batch_latency_seconds_count"
    )
    return 1000.0 * total / count


async def _until_both_gpus_busy(url: str) -> None:
    deadline = time.monotonic() + 15
    while "inferplan_gpus_busy 2.0" not in (await _get(f"{url}/metrics"))[1]:
        assert time.monotonic() < deadline, "the requests never reached both GPUs"
        await asyncio.sleep(0.02)


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_every_one_of_500_concurrent_requests_gets_its_own_output_and_latency_matches_the_simulator(tmp_path):
    # Two GPUs shed past 400 queued by default; this test wants all 500 at once inside the zones.
    model = ServiceModel(backpressure=Backpressure(queue_limit=2000))
    scenario = write_model_scenario(model, tmp_path / "model.toml", gpus=2)
    before = _ray_pids()
    with running_server("--backend", "ray", "--scenario", str(scenario), env=RAY_ENV, startup_s=120) as srv:
        status, ready = await _get(f"{srv.url}/readyz")
        assert status == 200 and '"actors_live": 2' in ready
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await asyncio.gather(*(_post(session, srv.url, f"ray {i}", DEV_KEYS[i % 3]) for i in range(500)))
        assert [s for s, _ in results] == [200] * 500
        assert [p["output"] for _, p in results] == [sim_output(f"ray {i}") for i in range(500)]

        # 150 req/s open loop for 20 s against the simulator given the arrivals the server saw.
        arr = generate_arrivals(RateSchedule(rps=150), 20.0, model.tier_shares, np.random.default_rng(9))
        before_metrics = (await _get(f"{srv.url}/metrics"))[1]
        sent = await send_open_loop(srv.url, arr, DEV_KEYS, model="ray-sim")
        after_metrics = (await _get(f"{srv.url}/metrics"))[1]
        batch_ms = _mean_batch_ms(before_metrics, after_metrics)
        print(f"mean backend time per batch {batch_ms:.2f} ms (the model's cycle: {model.gpu_cycle_ms():.2f} ms)")
        assert (sent.records.status == 200).all()
        order = np.argsort(sent.records.sent, kind="stable")
        seen = Arrivals(times=sent.records.sent[order], tiers=arr.tiers[order])
        warm = seen.times >= 2.0
        measured = ((sent.records.finished - sent.records.sent) * 1000.0)[order][warm]
        # The simulator with the model's cycle, and with Ray's own per-batch cost (what the server measured
        # its batches to take beyond the cycle) added to it: the capacity plan of a Ray deployment does the same.
        overhead = batch_ms - model.gpu_cycle_ms()
        with_ray = model.model_copy(update={"pcie_in_ms": model.pcie_in_ms + overhead})
        for label, sim_model, bound in (("the model's cycle", model, None), ("cycle + Ray's overhead", with_ray, 0.05)):
            simulated = simulate_arrivals(sim_model, seen, gpus=2).records.latency_ms[warm]
            for q in (50, 95):
                m, s = np.percentile(measured, q), np.percentile(simulated, q)
                print(f"ray, 150 req/s, {label}: P{q} measured {m:.1f} ms, simulated {s:.1f} ms ({(m - s) / s:+.1%})")
                if bound is not None:
                    assert abs(m - s) / s <= bound, (q, m, s)
    assert 0 < overhead < 20, overhead  # a few ms a batch on this machine: transport, not a second cycle
    assert srv.proc.returncode == 0
    time.sleep(1.0)
    assert not (_ray_pids() - before), "the local Ray outlived the server"


async def test_a_killed_actor_fails_exactly_its_batch_and_comes_back():
    with ray_head() as address, running_server(
        "--backend", "ray", "--ray-address", address, "--gpus", "2", "--kernel-ms", "10000", "--max-batch", "4",
        "--max-wait-ms", "5000", env=RAY_ENV, startup_s=120,
    ) as srv:  # fmt: skip
        async with aiohttp.ClientSession() as session:
            # Eight at once: the queue reaches 4 twice (batches form by size, the wait is 5 s), so GPU 0 and
            # GPU 1 each run a batch of 4, for 10 s: time enough for a second Ray client to connect and kill.
            batch = asyncio.gather(*(_post(session, srv.url, f"k {i}") for i in range(8)))
            await _until_both_gpus_busy(srv.url)
            kill = await asyncio.create_subprocess_exec(sys.executable, "-c", _KILL, address, "0",
                                                        env={**os.environ, **RAY_ENV})  # fmt: skip
            assert await kill.wait() == 0
            results = await batch
            codes = sorted(s for s, _ in results)
            assert codes == [200] * 4 + [503] * 4, codes
            failed = [p for s, p in results if s == 503]
            assert all(p["error"]["code"] == "backend_error" for p in failed), failed

            deadline = time.monotonic() + 60
            while '"actors_live": 2' not in (await _get(f"{srv.url}/readyz"))[1]:
                assert time.monotonic() < deadline, "the killed actor did not come back"
                await asyncio.sleep(0.5)
            later = await asyncio.gather(*(_post(session, srv.url, f"after {i}") for i in range(12)))
            assert [s for s, _ in later] == [200] * 12
            assert [p["output"] for _, p in later] == [sim_output(f"after {i}") for i in range(12)]
        metrics = (await _get(f"{srv.url}/metrics"))[1]
        assert "inferplan_engine_restarts_total 1.0" in metrics
    assert srv.proc.returncode == 0


async def test_sigterm_drains_the_batches_in_flight_and_leaves_no_ray_process():
    before = _ray_pids()
    with running_server(
        "--backend", "ray", "--gpus", "2", "--kernel-ms", "1000", "--max-batch", "4", "--max-wait-ms", "50",
        env=RAY_ENV, startup_s=120,
    ) as srv:  # fmt: skip
        assert _ray_pids() - before, "a local Ray should run while the server does"
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.gather(*(_post(session, srv.url, f"d {i}") for i in range(6)))
            await _until_both_gpus_busy(srv.url)  # 4 + 2 on the GPUs
            srv.proc.send_signal(15)
            results = await in_flight
        assert [s for s, _ in results] == [200] * 6  # drained, not dropped
        assert srv.proc.wait(timeout=60) == 0
    time.sleep(1.0)
    assert not (_ray_pids() - before), "the local Ray outlived the server"


@pytest.mark.redis
async def test_two_gateways_with_shared_queues_share_one_ray_cluster(tmp_path):
    scenario = str(write_model_scenario(ServiceModel(), tmp_path / "model.toml", gpus=1))
    args = ("--backend", "ray", "--scenario", scenario)
    with (
        ray_head() as address,
        redis_server() as redis,
        running_server(*args, "--ray-address", address, "--redis", redis.url, env=RAY_ENV, startup_s=120) as one,
        running_server(*args, "--ray-address", address, "--redis", redis.url, env=RAY_ENV, startup_s=120) as two,
    ):
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(_post(session, (one, two)[i % 2].url, f"g {i}", DEV_KEYS[i % 3]) for i in range(60))
            )
        assert [s for s, _ in results] == [200] * 60
        assert [p["output"] for _, p in results] == [sim_output(f"g {i}") for i in range(60)]
        listing = subprocess.run(
            [sys.executable, "-c", _LIST, address], env={**os.environ, **RAY_ENV}, capture_output=True, text=True,
            check=True, timeout=60,
        )  # fmt: skip
        assert len(set(listing.stdout.split())) == 2  # one actor per gateway, both in the one cluster


async def test_tokens_stream_through_the_actor_one_step_at_a_time(tmp_path):
    model = ServiceModel(decode_step_ms=25.0)  # each token a step of its own: a stream shows them arrive apart
    scenario = str(write_model_scenario(model, tmp_path / "model.toml", gpus=1))
    with running_server("--backend", "ray", "--scenario", scenario, env=RAY_ENV, startup_s=120) as srv:
        sdk = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="dev-paid", max_retries=0, timeout=30)
        prompt = "one two three"
        arrived, texts = [], []
        stream = await sdk.completions.create(model="ray-sim", prompt=prompt, max_tokens=6, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrived.append(time.perf_counter())
                texts.append(chunk.choices[0].text)
        assert "".join(texts) == sim_words(prompt, 6) and len(texts) == 6
        assert arrived[-1] - arrived[0] >= 0.8 * 5 * 0.025  # five decode steps apart, not one lump at the end


_LIST = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(" ".join(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)))
"""
