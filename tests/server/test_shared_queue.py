"""Scale-out: several server processes sharing tier queues in a real redis-server (``serve --redis``).

Every test starts its own redis-server on 127.0.0.1 in a temporary directory and its own
server processes, and stops them all. Load is open loop at a constant rate, bounded in
count, with a client timeout far above any expected latency, so a hang shows up as a
request that took that long rather than as a stuck test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pytest
from infer_plan.core import Backpressure, ServiceModel
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.loadtests.target import RedisProcess, redis_server, write_model_scenario
from infer_plan.server.backends.sim_gpu import sim_output
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals

from tests.helpers import DEV_KEYS, run_cli, running_server
from tests.server.faulty import FAIL

pytestmark = pytest.mark.redis

CLIENT_TIMEOUT_S = 20.0
SHARED_QUEUE_MS = 3.5  # the Redis path's added P50 here: +2.9 to +4.6 ms in benchmarks/bench_redis.py


@dataclass
class Sent:
    instance: int
    text: str
    status: int  # 0: no HTTP answer (connection refused or reset, client timeout)
    output: str | None
    code: str | None
    retry_after: str | None
    at: float  # seconds after the load started
    seconds: float


async def spread_load(urls: list[str], rate: float, seconds: float, tier: int = 1, prefix: str = "r") -> list[Sent]:
    """Request i goes to ``urls[i % len(urls)]`` at ``i / rate`` s, whatever the answers so far."""
    count = int(rate * seconds)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter()

        async def one(i: int) -> Sent:
            await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - start)))
            at = time.perf_counter() - start
            text = f"{prefix}-{i}"
            status, output, code, retry_after = 0, None, None, None
            try:
                async with session.post(
                    f"{urls[i % len(urls)]}/v1/inference",
                    json={"model": "sim", "input": text},
                    headers={"Authorization": f"Bearer {DEV_KEYS[tier]}"},
                ) as resp:
                    body = await resp.json(content_type=None)
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                    output = body.get("output")
                    code = (body.get("error") or {}).get("code")
            except (aiohttp.ClientError, TimeoutError):
                pass
            return Sent(i % len(urls), text, status, output, code, retry_after, at, time.perf_counter() - start - at)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def scenario(tmp_path: Path, **fields: object) -> str:
    return str(write_model_scenario(ServiceModel(**fields), tmp_path / "model.toml", gpus=1))


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    text = await (await session.get(f"{url}/metrics")).text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)


@contextlib.contextmanager
def instances(redis: RedisProcess, count: int, *args: str):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_server("--redis", redis.url, *args)) for _ in range(count)]


@pytest.fixture
def redis():
    with redis_server() as server:
        yield server


async def test_two_instances_answer_every_request_with_its_own_output_in_mixed_batches(redis, tmp_path):
    with instances(redis, 2, "--scenario", scenario(tmp_path)) as servers:
        sent = await spread_load([s.url for s in servers], rate=300, seconds=3)
        async with aiohttp.ClientSession() as session:
            mixed = [await metric(session, s.url, "inferplan_shared_mixed_batches_total") for s in servers]
            remote = [await metric(session, s.url, "inferplan_shared_remote_requests_total") for s in servers]
            batches = [await metric(session, s.url, "inferplan_batch_size_count") for s in servers]
    print(f"\n900 requests over 2 instances: batches {batches}, mixed {mixed}, run for the other instance {remote}")
    assert [s.status for s in sent] == [200] * len(sent)
    assert [s.output for s in sent] == [sim_output(s.text) for s in sent]
    assert all(b > 0 for b in batches), "both instances' GPUs took batches from the shared queue"
    assert all(r > 0 for r in remote), "each instance ran requests the other admitted"
    assert sum(mixed) > 0


@pytest.mark.slow
async def test_two_instances_of_one_gpu_behave_as_the_simulators_pool_of_two(redis):
    # The topology in the simulator: instances sharing the queue are one pool of their GPUs, plus the
    # Redis path's per-request time (shared_queue_ms, from benchmarks/bench_redis.py).
    model = ServiceModel(shared_queue_ms=SHARED_QUEUE_MS)
    arr = generate_arrivals(RateSchedule(rps=250), 15.0, model.tier_shares, np.random.default_rng(5))
    with running_server("--redis", redis.url, "--instances", "2", "--gpus", "1") as server:
        result = await send_open_loop(server.url, arr, DEV_KEYS)
    assert (result.records.status == 200).all()
    order = np.argsort(result.records.sent, kind="stable")  # as in test_server: the arrivals the server saw
    seen = Arrivals(times=result.records.sent[order], tiers=arr.tiers[order])
    simulated = simulate_arrivals(model, seen, gpus=2).records.latency_ms
    apart = simulate_arrivals(model, seen, gpus=1).records.latency_ms
    warm = seen.times >= 2.0
    measured = ((result.records.finished - result.records.sent) * 1000.0)[order][warm]
    # The Redis path's added time has a tail (about +8 ms at P95 against +3.5 at P50 in the benchmark) that
    # a constant hop does not model: hence the wider P95 bound. A lone GPU is 20-30% off at both. Measured sits
    # above simulated by the servers' own HTTP and event-loop time, which the model leaves out: +2.9% / +5.0%
    # when first measured, +4.5% to +6.9% at P50 and +9.4% to +10.9% at P95 on 2026-11-24 on the same kind of
    # machine. The pool of two still differs from a lone GPU by 15-30%.
    for q, bound in ((50, 0.075), (95, 0.15)):
        m, s, one = (np.percentile(x, q) for x in (measured, simulated[warm], apart[warm]))
        print(f"P{q}: measured {m:.1f} ms, pool of 2 simulated {s:.1f} ms ({(m - s) / s:+.1%}); one GPU {one:.1f} ms")
        assert abs(m - s) / s <= bound, (q, m, s)
        assert abs(m - one) / one > 0.1


async def test_a_failed_batch_answers_every_owner_with_the_error(redis, tmp_path):
    # 500 ms assembly: all 20 requests, 10 through each instance, land in one batch with the poisoned one.
    model = scenario(tmp_path, max_wait_ms=500)
    backend = ("--backend", "tests.server.faulty:FaultyBackend", "--served-model-name", "sim", "--scenario", model)
    with instances(redis, 2, *backend) as (a, b):
        async with aiohttp.ClientSession() as session:

            async def one(server, text: str) -> tuple[int, dict, str | None]:
                async with session.post(
                    f"{server.url}/v1/inference",
                    json={"model": "sim", "input": text},
                    headers={"Authorization": "Bearer dev-paid"},
                ) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            for poison in (FAIL, None):
                texts = [poison or "ok-0", *(f"ok-{i}" for i in range(1, 20))]
                answers = await asyncio.gather(*(one(a if i % 2 == 0 else b, t) for i, t in enumerate(texts)))
                if poison:
                    got = [(status, body["error"]["code"], retry) for status, body, retry in answers]
                    assert got == [(503, "backend_error", "1")] * 20
                else:
                    assert [body["output"] for _, body, _ in answers] == [sim_output(t) for t in texts]


@pytest.mark.slow
async def test_backpressure_uses_the_shared_depth_so_all_instances_shed_alike(redis, tmp_path):
    # Nothing leaves the queue for 8 s (a batch needs 100 or an 8 s wait), so the depth is exact.
    # Two instances x 1 GPU, queue limit 40: free shed from 20 queued, paid from 30, all from 40.
    model = scenario(tmp_path, max_wait_ms=8000, backpressure=Backpressure(queue_limit=40))
    with instances(redis, 2, "--scenario", model) as (a, b):
        async with aiohttp.ClientSession() as session:

            async def queued(server) -> int:
                async with session.get(f"{server.url}/readyz") as resp:
                    return (await resp.json())["queued"]

            async def send(server, tier: int, text: str) -> asyncio.Task:
                before = await queued(server)
                task = asyncio.create_task(
                    session.post(
                        f"{server.url}/v1/inference",
                        json={"model": "sim", "input": text},
                        headers={"Authorization": f"Bearer {DEV_KEYS[tier]}"},
                    )
                )
                for _ in range(250):  # admitted before the next one is sent, however busy the machine (CI once
                    if await queued(server) > before:  # saw 20 ms fall short, and a paid request admitted)
                        break
                    await asyncio.sleep(0.02)
                return task

            async def status_now(server, tier: int, text: str) -> int:
                async with session.post(
                    f"{server.url}/v1/inference",
                    json={"model": "sim", "input": text},
                    headers={"Authorization": f"Bearer {DEV_KEYS[tier]}"},
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as resp:
                    return resp.status

            waiting = [await send(a, 1, f"a{i}") for i in range(20)]  # depth 20, all through instance a
            assert await status_now(b, 2, "free-at-b") == 429  # b sheds free: it sees a's requests
            assert await status_now(a, 2, "free-at-a") == 429
            waiting += [await send(b, 1, f"b{i}") for i in range(10)]  # depth 30: paid via b still admitted
            assert await status_now(a, 1, "paid-at-a") == 429
            assert await status_now(b, 1, "paid-at-b") == 429
            waiting += [await send(a, 0, f"e{i}") for i in range(10)]  # enterprise until the limit, 40
            assert await status_now(b, 0, "enterprise-at-b") == 429
            answers = await asyncio.gather(*waiting)
            assert [r.status for r in answers] == [200] * 40
            outputs = [(await r.json())["output"] for r in answers]
    texts = [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(10)] + [f"e{i}" for i in range(10)]
    assert outputs == [sim_output(t) for t in texts]


@pytest.mark.slow  # about 12 s: the full suite runs it
async def test_kill_9_of_one_instance_loses_none_of_the_others_requests(redis, tmp_path):
    # 1 s batches keep both GPUs busy, so the killed instance dies holding a batch with the survivor's requests.
    with instances(redis, 2, "--scenario", scenario(tmp_path, kernel_ms=1000, pcie_in_ms=0, pcie_out_ms=0)) as (a, b):
        load = asyncio.create_task(spread_load([a.url, b.url], rate=60, seconds=8))
        await asyncio.sleep(3.5)
        async with aiohttp.ClientSession() as session:  # between two batches a few percent of the time: wait
            for _ in range(100):  # for one (a second long), so it dies holding it
                if await metric(session, b.url, "inferplan_gpus_busy") >= 1:
                    break
                await asyncio.sleep(0.01)
        b.proc.kill()
        sent = await load
        async with aiohttp.ClientSession() as session:
            requeued = await metric(session, a.url, "inferplan_shared_reclaimed_requests_total")
    survivor = [s for s in sent if s.instance == 0]
    print(
        f"\nkill -9 at 3.5 s: survivor's {len(survivor)} requests {sorted({s.status for s in survivor})}, "
        f"slowest {max(s.seconds for s in survivor):.2f} s; reclaimed from the dead instance's batch: {requeued:.0f}"
    )
    assert [s.status for s in survivor] == [200] * len(survivor)
    assert [s.output for s in survivor] == [sim_output(s.text) for s in survivor]
    assert requeued > 0, "the dead instance held a batch; its survivor's requests were requeued from the lease"
    assert max(s.seconds for s in survivor) < 8, "reclaimed within the liveness TTL plus a rerun"


@pytest.mark.slow
async def test_sigterm_drains_one_instance_while_the_other_keeps_serving(redis, tmp_path):
    with instances(redis, 2, "--scenario", scenario(tmp_path)) as (a, b):
        load = asyncio.create_task(spread_load([a.url, b.url], rate=100, seconds=6))
        await asyncio.sleep(2.0)
        signalled = time.perf_counter()
        a.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(a.proc.wait, 20)
        drain_s = time.perf_counter() - signalled
        sent = await load
    before = [s for s in sent if s.instance == 0 and s.at < 1.9]
    print(f"\nSIGTERM to one of 2 instances under 100 req/s: exit {code} after {drain_s:.2f} s")
    assert code == 0 and drain_s < 5.0, "the drain ends once its own requests are answered"
    assert [s.status for s in before] == [200] * len(before)
    assert all(s.status == 200 and s.output == sim_output(s.text) for s in sent if s.instance == 1)
    assert {s.status for s in sent if s.instance == 0 and s.at > 2.1} <= {0, 503}  # draining, then gone


@pytest.mark.slow  # about 12 s: the full suite runs it
async def test_redis_restart_mid_load_gives_503_or_success_never_a_hang_and_service_resumes(redis, tmp_path):
    with instances(redis, 2, "--scenario", scenario(tmp_path)) as servers:
        load = asyncio.create_task(spread_load([s.url for s in servers], rate=100, seconds=9))
        await asyncio.sleep(2.5)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)
        sent = await load
        logs = [s.log_text() for s in servers]
    by_status = {code: sum(s.status == code for s in sent) for code in sorted({s.status for s in sent})}
    print(f"\nRedis down 2.5-3.5 s of 9 s: {by_status}; slowest {max(s.seconds for s in sent):.2f} s")
    unanswered = [(s.instance, round(s.at, 3), round(s.seconds, 3)) for s in sent if s.status == 0]
    assert set(by_status) <= {200, 503}, (unanswered, [log[-3000:] for log in logs])
    assert all(s.code == "queue_unavailable" and s.retry_after == "1" for s in sent if s.status == 503)
    assert all(s.output == sim_output(s.text) for s in sent if s.status == 200)
    assert by_status.get(503, 0) > 0, "the outage was noticed"
    assert max(s.seconds for s in sent) < 3.0, "nobody waited for a deadline"
    # Redis is back at about 3.5 s; on a loaded 2-core machine reconnecting took up to ~3 s once.
    last_503 = max((s.at for s in sent if s.status == 503), default=0.0)
    assert all(s.status == 200 for s in sent if s.at > 7.0), f"service resumed by itself (last 503 at {last_503:.2f} s)"
    assert all("unreachable" in log and "reachable; serving" in log.split("unreachable")[-1] for log in logs)
    assert not any("Traceback" in log for log in logs)


async def test_unreachable_redis_gives_503_with_a_message_then_service_resumes(tmp_path):
    redis = RedisProcess(tmp_path)  # a port chosen, nothing listening yet
    try:
        with running_server("--redis", redis.url) as server:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                started = time.perf_counter()
                resp = await session.post(
                    f"{server.url}/v1/inference",
                    json={"model": "sim", "input": "x"},
                    headers={"Authorization": "Bearer dev-paid"},
                )
                body = await resp.json()
                assert resp.status == 503 and time.perf_counter() - started < 1.0
                assert body["error"]["code"] == "queue_unavailable" and "Redis" in body["error"]["message"]
                assert resp.headers["Retry-After"] == "1"
                ready = await session.get(f"{server.url}/readyz")
                assert ready.status == 503 and "Redis" in (await ready.json())["error"]["message"]
                redis.start()
                deadline = time.monotonic() + 5
                while (await session.get(f"{server.url}/readyz")).status != 200:
                    assert time.monotonic() < deadline, "did not resume within 5 s of Redis starting"
                    await asyncio.sleep(0.1)
                resp = await session.post(
                    f"{server.url}/v1/inference",
                    json={"model": "sim", "input": "x"},
                    headers={"Authorization": "Bearer dev-paid"},
                )
                assert resp.status == 200 and (await resp.json())["output"] == sim_output("x")
    finally:
        redis.stop()


async def test_instances_flag_runs_several_processes_restarts_a_dead_one_and_stops_all(redis):
    with running_server("--redis", redis.url, "--instances", "2") as server:
        supervisor = psutil.Process(server.pid)
        children = instance_pids(supervisor)
        assert len(children) == 2
        sent = await spread_load([server.url], rate=200, seconds=2)
        assert [s.status for s in sent] == [200] * len(sent)
        os.kill(min(children), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while instance_pids(supervisor) in (children, children - {min(children)}):
            assert time.monotonic() < deadline, "the dead instance was not replaced"
            await asyncio.sleep(0.2)
        replaced = instance_pids(supervisor)
        assert len(replaced) == 2 and min(children) not in replaced
        await asyncio.sleep(3)  # the new instance announces itself and subscribes
        sent = await spread_load([server.url], rate=200, seconds=2, prefix="after")
        assert [s.status for s in sent] == [200] * len(sent)
        assert server.terminate() == 0
    assert not any(psutil.pid_exists(pid) for pid in replaced)


def instance_pids(supervisor: psutil.Process) -> set[int]:
    """The live server children (multiprocessing also starts a resource tracker, which is not one)."""
    pids = set()
    for child in supervisor.children():
        with contextlib.suppress(psutil.Error):  # a child just killed is a zombie until reaped
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def test_instances_without_redis_is_a_usage_error():
    result = run_cli("serve", "--port", "0", "--instances", "2", timeout=60)
    assert result.returncode == 2
    assert "--instances > 1 needs --redis" in result.stderr and "Traceback" not in result.stderr
