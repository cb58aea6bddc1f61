"""The reference server as a client sees it: a real process on 127.0.0.1, real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import numpy as np
import pytest
from infer_plan.core import ServiceModel, Tier
from infer_plan.loadtests.openloop import send_open_loop
from infer_plan.server.backends.sim_gpu import sim_output
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals, generate_arrivals

from tests.helpers import DEV_KEYS, run_cli, running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    # 8 GPUs: the backpressure zones (yellow at 1,600 queued) stay green for 1,000 concurrent requests.
    with running_server("--gpus", "8") as srv:
        yield srv


async def post(session, url, body, key="dev-paid", raw=None, headers=None):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    hdrs.update(headers or {})
    kwargs = {"data": raw} if raw is not None else {"json": body}
    async with session.post(url, headers=hdrs, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


@pytest.mark.parametrize(
    ("body", "raw", "key", "status", "code"),
    [
        (None, b"{not json", "dev-paid", 400, "bad_request"),
        (None, b"\xff\xfe\x00", "dev-paid", 400, "bad_request"),
        ([1, 2], None, "dev-paid", 400, "bad_request"),
        ({"model": "sim"}, None, "dev-paid", 400, "bad_request"),
        ({"input": "x"}, None, "dev-paid", 400, "bad_request"),
        ({"model": "sim", "input": 5}, None, "dev-paid", 400, "bad_request"),
        ({"model": "sim", "input": "x" * 20_000}, None, "dev-paid", 413, "payload_too_large"),
        (None, b'{"model":"sim","input":"' + b"y" * 200_000 + b'"}', "dev-paid", 413, "payload_too_large"),
        ({"model": "sim", "input": "x"}, None, "nope", 401, "unauthorized"),
        ({"model": "sim", "input": "x"}, None, None, 401, "unauthorized"),
        ({"model": "gpt-9", "input": "x"}, None, "dev-paid", 404, "not_found"),
    ],
)
async def test_errors_have_status_and_json_body(server, body, raw, key, status, code):
    async with aiohttp.ClientSession() as session:
        got, payload, _ = await post(session, f"{server.url}/v1/inference", body, key=key, raw=raw)
    assert got == status
    assert payload["error"]["code"] == code and payload["error"]["message"]


async def test_internal_batch_is_not_public_and_refuses_client_keys(server):
    body = {"batch_id": "b1", "requests": [{"input": "a"}, {"input": "b"}]}
    async with aiohttp.ClientSession() as session:
        status, payload, _ = await post(session, f"{server.url}/internal/batch", body)
        assert status == 404 and payload["error"]["code"] == "not_found"
        status, payload, _ = await post(session, f"{server.internal_url}/internal/batch", body, key="dev-enterprise")
        assert status == 403 and payload["error"]["code"] == "forbidden"
        status, payload, _ = await post(session, f"{server.internal_url}/internal/batch", body, key=None)
    assert status == 200
    assert payload["batch_id"] == "b1" and payload["status"] == "ok"
    assert [r["output"] for r in payload["results"]] == [sim_output("a"), sim_output("b")]


async def test_batch_log_lists_client_traffic_only_within_its_window():
    with running_server("--gpus", "1") as srv:  # a fresh log: nothing served yet
        async with aiohttp.ClientSession() as session:

            async def log(query="", key=None):
                hdrs = {"Authorization": f"Bearer {key}"} if key else {}
                async with session.get(f"{srv.internal_url}/internal/batches{query}", headers=hdrs) as resp:
                    return resp.status, await resp.json(content_type=None)

            body = {"batch_id": "synthetic", "requests": [{"input": "a"}, {"input": "b"}]}
            assert (await post(session, f"{srv.internal_url}/internal/batch", body, key=None))[0] == 200
            assert (await log())[1]["batches"] == []  # an internal-API batch is not client traffic
            answers = await asyncio.gather(
                *(post(session, f"{srv.url}/v1/inference", {"model": "sim", "input": f"t{i}"}) for i in range(7))
            )
            assert [a[0] for a in answers] == [200] * 7
            status, payload = await log("?window_s=60")
            assert status == 200 and payload["columns"] == ["ended_at", "size", "ms", "phases"]
            rows = payload["batches"]
            assert sum(size for _, size, _, _ in rows) == 7 and len(rows) <= 2  # one batch, or two if split
            cycle = ServiceModel().gpu_cycle_ms()
            assert all(cycle - 1 <= ms <= cycle + 50 and abs(ended - time.time()) < 30 for ended, _, ms, _ in rows)
            assert all(phases is None for *_, phases in rows)  # the sim backend sleeps its phases, times none
            await asyncio.sleep(1.2)
            assert (await log("?window_s=1"))[1]["batches"] == []  # served more than a second ago
            for bad in ("?window_s=0", "?window_s=-5", "?window_s=abc", "?window_s=nan"):
                status, payload = await log(bad)
                assert status == 400 and "window_s" in payload["error"]["message"], bad
            status, payload = await log(key="dev-paid")
            assert status == 403 and payload["error"]["code"] == "forbidden"
        async with aiohttp.ClientSession() as session, session.get(f"{srv.url}/internal/batches") as resp:
            assert resp.status == 404  # not on the public port


async def test_a_thousand_concurrent_requests_each_get_their_own_output(server):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i):
            key = DEV_KEYS[i % 3]
            return await post(session, f"{server.url}/v1/inference", {"model": "sim", "input": f"text {i}"}, key=key)

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        metrics = await (await session.get(f"{server.url}/metrics")).text()
    assert all(status == 200 for status, _, _ in results)
    assert [payload["output"] for _, payload, _ in results] == [sim_output(f"text {i}") for i in range(1000)]
    assert len({payload["request_id"] for _, payload, _ in results}) == 1000
    # No batch above max_batch: the histogram's 100 bucket holds every batch.
    count = _metric(metrics, "inferplan_batch_size_count")
    assert count >= 10
    assert _metric(metrics, 'inferplan_batch_size_bucket{le="100.0"}') == count


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_lone_request_leaves_after_the_timeout_plus_one_cycle(server):
    model = ServiceModel()
    expected = model.max_wait_ms + model.gpu_cycle_ms()
    async with aiohttp.ClientSession() as session:
        await post(session, f"{server.url}/v1/inference", {"model": "sim", "input": "warm the connection"})
        await asyncio.sleep(0.2)
        latencies = []
        for i in range(5):
            start = time.perf_counter()
            status, _, _ = await post(session, f"{server.url}/v1/inference", {"model": "sim", "input": f"l{i}"})
            latencies.append((time.perf_counter() - start) * 1000)
            assert status == 200
            await asyncio.sleep(0.2)  # GPU idle again
    assert expected - 1 <= min(latencies)
    # A second assembly wait or a missed wake-up would add >= max_wait (40 ms) to every request; the
    # margins below allow for a busy CI machine (its median was +8.7 ms once) and still catch that.
    assert float(np.median(latencies)) <= expected + 20 and max(latencies) <= expected + 35


async def test_health_ready_and_metrics(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{server.url}/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["gpus"] == 8
        async with session.get(f"{server.url}/metrics") as resp:
            text = await resp.text()
    for name in (
        "inferplan_queue_depth",
        "inferplan_batch_size",
        "inferplan_batch_latency_seconds",
        "inferplan_gpu_busy_seconds_total",
        "inferplan_rejected_total",
    ):
        assert name in text


async def test_overload_sheds_free_first_and_keeps_serving_enterprise():
    # Cycle 410 ms: one GPU serves ~244 req/s; offer 600 req/s for 4 s.
    with running_server("--gpus", "1", "--kernel-ms", "400") as srv:
        arr = generate_arrivals(RateSchedule(rps=600), 4.0, ServiceModel().tier_shares, np.random.default_rng(1))
        result = await send_open_loop(srv.url, arr, DEV_KEYS)
    status = result.records.status
    assert set(np.unique(status)) <= {200, 429}
    by_tier = {t: status[result.records.tier == t] for t in Tier}
    assert (by_tier[Tier.ENTERPRISE] == 200).all()
    free_shed = (by_tier[Tier.FREE] == 429).mean()
    paid_shed = (by_tier[Tier.PAID] == 429).mean()
    assert free_shed > 0.5 and free_shed > paid_shed
    first_429 = int(np.argmax(status == 429))
    assert result.records.tier[first_429] == Tier.FREE
    ok = status == 200
    assert all(result.outputs[i] == sim_output(result.inputs[i]) for i in np.flatnonzero(ok))


async def test_sigterm_under_load_loses_no_accepted_request():
    with running_server("--gpus", "1", "--drain-timeout", "20") as srv:
        arr = generate_arrivals(RateSchedule(rps=300), 3.0, ServiceModel().tier_shares, np.random.default_rng(2))
        sender = asyncio.create_task(send_open_loop(srv.url, arr, DEV_KEYS, timeout_s=30))
        await asyncio.sleep(1.5)
        srv.proc.send_signal(15)
        signalled = 1.5
        result = await sender
        code = srv.proc.wait(timeout=30)
    assert code == 0
    # Sent half a second before the signal: read and accepted before it, even when the server stalls (a stall of
    # the shared machine once left the 0.2 s of requests before the signal unread until after it: 503 draining).
    before = result.records.sent < signalled - 0.5
    assert (result.records.status[before] == 200).all(), np.unique(result.records.status[before], return_counts=True)
    # After the signal: served (accepted earlier), 503 while draining, or refused once the listener closed.
    assert set(np.unique(result.records.status[~before])) <= {200, 503, 0}
    served = np.flatnonzero(result.records.status == 200)
    assert all(result.outputs[i] == sim_output(result.inputs[i]) for i in served)


async def test_measured_latency_matches_the_simulator_at_200_rps():
    model = ServiceModel()
    arr = generate_arrivals(RateSchedule(rps=200), 20.0, model.tier_shares, np.random.default_rng(7))
    with running_server("--gpus", "1") as srv:
        result = await send_open_loop(srv.url, arr, DEV_KEYS)
    assert (result.records.status == 200).all()
    # The simulator gets the arrivals the server actually saw (the actual send times): this test is
    # about the server reproducing the model, and the Python sender's own lag on these shared 2 cores
    # (a P95 of several ms) belongs to neither. Latency from scheduled send is what loadtest reports.
    order = np.argsort(result.records.sent, kind="stable")
    seen = Arrivals(times=result.records.sent[order], tiers=arr.tiers[order])
    predicted = simulate_arrivals(model, seen, gpus=1)
    sim_ms = predicted.records.latency_ms
    warm = seen.times >= 2.0
    measured = ((result.records.finished - result.records.sent) * 1000.0)[order][warm]
    for q in (50, 95):
        m, s = np.percentile(measured, q), np.percentile(sim_ms[warm], q)
        print(f"P{q}: measured {m:.1f} ms, simulated {s:.1f} ms ({(m - s) / s:+.1%})")
        # The server's own HTTP and event-loop time (a few ms on 2 shared cores) is not in the model: +4.4% and
        # +6.6% at P50 were both seen on 2026-11-24.
        assert abs(m - s) / s <= 0.075, (q, m, s)


def test_a_client_that_hangs_up_mid_body_is_one_quiet_line_not_a_server_error():
    with running_server("--gpus", "1", access_log=True) as srv:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as raw:  # promises 100 bytes, sends 9, hangs up
            raw.sendall(
                b"POST /v1/inference HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer dev-paid\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'
            )
            time.sleep(0.2)
        time.sleep(0.3)

        async def then_serve() -> tuple[int, str]:
            async with aiohttp.ClientSession() as session:
                status, _, _ = await post(session, f"{srv.url}/v1/inference", {"model": "sim", "input": "next"})
                return status, await (await session.get(f"{srv.url}/metrics")).text()

        status, metrics = asyncio.run(then_serve())
        log = srv.log_text()
    assert status == 200
    assert _metric(metrics, 'inferplan_client_disconnects_total{stage="request"}') == 1
    lines = [line for line in log.splitlines() if "disconnected" in line]
    assert len(lines) == 1 and "POST /v1/inference" in lines[0], log
    assert "Traceback" not in log and '"status":500' not in log and "ConnectionResetError" not in log


def test_serve_refuses_a_model_without_overlap_in_one_line(tmp_path):
    scenario = tmp_path / "no-overlap.toml"
    scenario.write_text("[service]\noverlap = false\n")
    done = run_cli("serve", "--port", "0", "--scenario", str(scenario), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "overlap" in done.stderr and "Traceback" not in done.stderr
