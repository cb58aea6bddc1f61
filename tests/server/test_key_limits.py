"""Secure and fair by default: development keys only on loopback, per-key rate and in-flight limits.

Servers are real processes on 127.0.0.1 (one, or two sharing a real redis-server);
load is paced and bounded in count and time; every process is stopped by its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from infer_plan.core.errors import ConfigError
from infer_plan.core.key_limits import KeyLimits, bucket_take, retry_after_header
from infer_plan.core.tiers import Tier
from infer_plan.loadtests.target import redis_server
from infer_plan.server.access.key_limiter import CONCURRENCY_LIMITED, RATE_LIMITED, LocalKeyLimiter
from infer_plan.server.access.keys import KeyStore
from infer_plan.server.api_errors import ApiError
from infer_plan.server.metrics import ServerMetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import run_cli, running_server

pytestmark = pytest.mark.timeout(240)

FLOODER, NEIGHBOUR = "k-paid-flooder-0001", "k-paid-neighbour-0002"
LIMIT_RPS = 20
# A batch leaves as soon as a GPU is free, and GPUs to spare: a request's latency is then one
# cycle whoever else sends, so a change in the neighbour's latency would be the flooder's doing.
UNCROWDED = ("--max-wait-ms", "0")


# -- the rule and the keys file ------------------------------------------------------------


def test_bucket_starts_full_refills_at_rps_and_says_when_the_next_token_comes():
    took = bucket_take(tokens=5, updated_s=0, now_s=0, rps=10, burst=5)
    assert took.admitted and took.tokens == 4
    empty = bucket_take(tokens=0.25, updated_s=0, now_s=0, rps=10, burst=5)
    assert not empty.admitted and empty.retry_after_s == pytest.approx(0.075)
    honoured = bucket_take(empty.tokens, 0, empty.retry_after_s, rps=10, burst=5)
    assert honoured.admitted  # waiting exactly Retry-After's worth is enough
    assert bucket_take(0, 0, 3600, rps=10, burst=5).tokens == 4  # refills to burst, never past it
    assert retry_after_header(0.001) == 1 and retry_after_header(1.0) == 1 and retry_after_header(1.2) == 2


async def test_local_limiter_admits_burst_then_refuses_until_the_bucket_refills():
    now = [0.0]
    limiter = LocalKeyLimiter(ServerMetrics(), clock=lambda: now[0])
    store = KeyStore({"k": {"tier": "paid", "rps": 2, "burst": 3, "max_in_flight": 10}})
    grant = store.grant_of("k")
    slots = [await limiter.admit(grant) for _ in range(3)]
    with pytest.raises(ApiError) as refused:
        await limiter.admit(grant)
    assert refused.value.code == RATE_LIMITED and refused.value.retry_after_s == 1
    now[0] = 0.5  # one token at 2/s
    slots.append(await limiter.admit(grant))
    for slot in slots:
        limiter.release(slot)
    assert limiter._in_flight == {}  # every slot given back


def test_keys_file_takes_plain_tiers_and_tables_with_limits(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(
        '[keys]\n"k-a" = "enterprise"\n"k-b" = { tier = "paid", rps = 50, burst = 100, max_in_flight = 200 }\n'
        '[keys."k-c"]\ntier = "free"\nrps = 2.5\n'
    )
    store = KeyStore.load(path)
    assert store.grant_of("k-a").limits == KeyLimits() and store.grant_of("k-a").tier is Tier.ENTERPRISE
    assert store.grant_of("k-b").limits == KeyLimits(rps=50, burst=100, max_in_flight=200)
    assert store.grant_of("k-c").limits == KeyLimits(rps=2.5, burst=2.5)
    assert store.grant_of("k-a").key_id != store.grant_of("k-b").key_id


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("{ tier = 'paid', rps = -5 }", "rps must be a number > 0"),
        ("{ tier = 'paid', rps = 10, burst = 0.5 }", "burst must be a number >= 1"),
        ("{ tier = 'paid', burst = 10 }", "burst needs rps"),
        ("{ tier = 'paid', max_in_flight = 0 }", "max_in_flight must be an integer >= 1"),
        ("{ tier = 'paid', max_in_flight = 2.5 }", "max_in_flight must be an integer"),
        ("{ tier = 'paid', rps = 'fast' }", "rps must be a number"),
        ("{ tier = 'paid', rpm = 10 }", "unknown field(s) rpm"),
        ("{ rps = 10 }", "needs tier"),
        ("{ tier = 'gold' }", "gold"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_line_not_the_key(tmp_path, entry, says):
    secret = "k-secret-4c1d7e"
    path = tmp_path / "keys.toml"
    path.write_text(f'# keys\n[keys]\n"k-ok" = "paid"\n\n"{secret}" = {entry}\n')
    with pytest.raises(ConfigError) as err:
        KeyStore.load(path)
    assert f"{path}, line 5: " in str(err.value) and says in str(err.value)
    assert secret not in str(err.value)
    done = run_cli("serve", "--keys", str(path), "--port", "0", timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 5" in lines[0] and secret not in lines[0]


# -- development keys only on loopback -----------------------------------------------------


def test_dev_keys_on_a_public_address_are_refused_with_how_to_pass_keys():
    done = run_cli("serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--keys" in lines[0] and "--allow-dev-keys" in lines[0], done.stderr
    many = run_cli("serve", "--host", "0.0.0.0", "--instances", "2", "--redis", "redis://127.0.0.1:1", timeout=60)
    assert many.returncode == 2 and "--allow-dev-keys" in many.stderr


async def test_allow_dev_keys_serves_on_a_public_address_and_warns():
    with running_server("--host", "0.0.0.0", "--allow-dev-keys") as srv:
        url = srv.url.replace("0.0.0.0", "127.0.0.1")  # traffic stays on loopback
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/inference",
                json={"model": "sim", "input": "hi"},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp,
        ):
            assert resp.status == 200
        assert srv.terminate() == 0
        assert "WARNING: serving the public development keys on 0.0.0.0" in srv.log_text()


# -- limits on a running server ------------------------------------------------------------


@dataclass
class Answer:
    status: int
    code: str | None
    retry_after: str | None
    seconds: float  # as the client timed it
    server_seconds: float | None  # arrival to answer as the server timed it (its body's latency_ms)


async def post(session: aiohttp.ClientSession, url: str, key: str, text: str) -> Answer:
    start = time.perf_counter()
    async with session.post(
        f"{url}/v1/inference", json={"model": "sim", "input": text}, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        body = await resp.json(content_type=None)
        code = (body.get("error") or {}).get("code")
        served = body.get("latency_ms") if resp.status == 200 else None
        seconds = time.perf_counter() - start
        return Answer(resp.status, code, resp.headers.get("Retry-After"), seconds, served and served / 1000.0)


async def paced(session, urls: list[str], key: str, rate: float, seconds: float) -> list[Answer]:
    """``rate * seconds`` requests of one key, request i at i / rate s, spread over ``urls``."""
    start = time.perf_counter()

    async def one(i: int) -> Answer:
        await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - start)))
        return await post(session, urls[i % len(urls)], key, f"{key[-4:]}-{i}")

    return list(await asyncio.gather(*(one(i) for i in range(int(rate * seconds)))))


def limited_keys(tmp_path: Path, **flooder: int) -> str:
    path = tmp_path / "keys.toml"
    limits = ", ".join(f"{k} = {v}" for k, v in flooder.items())
    path.write_text(f'[keys]\n"{FLOODER}" = {{ tier = "paid", {limits} }}\n"{NEIGHBOUR}" = "paid"\n')
    return str(path)


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    text = await (await session.get(f"{url}/metrics")).text()
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def flood_and_compare(urls: list[str]) -> None:
    """The neighbour alone, then beside a flooder at 10x its rate: see the module's 'Must show'."""
    seconds, neighbour_rps = 10.0, 10.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        alone = await paced(session, urls, NEIGHBOUR, neighbour_rps, seconds)
        await asyncio.sleep(1.5)  # the flooder's bucket is full again; nothing of the first run is left
        flood, beside = await asyncio.gather(
            paced(session, urls, FLOODER, 10 * LIMIT_RPS, seconds),
            paced(session, urls, NEIGHBOUR, neighbour_rps, seconds),
        )
        limited = [a for a in flood if a.status == 429]
        assert limited and all(a.code == RATE_LIMITED and a.retry_after == "1" for a in limited)
        assert {a.status for a in flood} == {200, 429}
        served = sum(a.status == 200 for a in flood)
        # The bucket across all instances: burst at once, then LIMIT_RPS (a per-instance bucket would double it).
        assert LIMIT_RPS * seconds * 0.8 <= served <= LIMIT_RPS * (seconds + 1) + LIMIT_RPS
        await asyncio.sleep(int(limited[-1].retry_after))  # honour Retry-After: the next request succeeds
        assert (await post(session, urls[0], FLOODER, "after")).status == 200
        rejected = sum(
            [await metric(session, u, "inferplan_rejected_total", tier="paid", reason=RATE_LIMITED) for u in urls]
        )
        assert rejected == len(limited)
    assert all(a.status == 200 for a in alone + beside)
    # The neighbour's experience is judged by the server's own clock: the flooder's 200 req/s share this
    # test's one client process with the neighbour, whose client-side times then carry that event loop's
    # delays (P95 +60% on a busy CI run), which two real clients on two hosts would not have. The median is
    # also held at the client, where those delays do not reach.
    assert statistics.median(a.seconds for a in beside) <= 1.10 * statistics.median(a.seconds for a in alone)
    p50_alone, p95_alone = np.percentile([a.server_seconds for a in alone], [50, 95])
    p50_beside, p95_beside = np.percentile([a.server_seconds for a in beside], [50, 95])
    print(f"\nneighbour alone / beside the flooder, server-timed: P50 {p50_alone * 1000:.1f} / "
          f"{p50_beside * 1000:.1f} ms, P95 {p95_alone * 1000:.1f} / {p95_beside * 1000:.1f} ms")  # fmt: skip
    # A neighbour that waited for the flooder's batches would wait up to a batch cycle (110 ms) more, +95% at
    # P95. Server-timed, with a CPU hog on one of two cores, P95 moved by 0-1 ms (111-113 ms alone and beside,
    # one instance and two on Redis); held to 25%, room for a busier host, a third of the cycle.
    assert p50_beside <= 1.10 * p50_alone, (p50_alone, p50_beside)
    assert p95_beside - p95_alone <= 0.25 * p95_alone, (p95_alone, p95_beside)


@pytest.mark.slow
async def test_a_flooding_key_is_rate_limited_and_its_neighbour_does_not_notice(tmp_path):
    keys = limited_keys(tmp_path, rps=LIMIT_RPS, burst=LIMIT_RPS)
    with running_server("--keys", keys, *UNCROWDED, "--gpus", "8") as srv:
        await flood_and_compare([srv.url])
        assert srv.terminate() == 0


@pytest.mark.slow
@pytest.mark.redis
async def test_the_rate_limit_holds_across_two_instances_sharing_redis(tmp_path):
    keys = limited_keys(tmp_path, rps=LIMIT_RPS, burst=LIMIT_RPS)
    with redis_server() as redis, contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running_server("--redis", redis.url, "--keys", keys, *UNCROWDED, "--gpus", "4"))
            for _ in range(2)
        ]
        await flood_and_compare([s.url for s in servers])


async def in_flight_burst(urls: list[str], cap: int, count: int) -> None:
    """``count`` requests of one key at once: never more than ``cap`` in flight, counted by the server."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        answers = await asyncio.gather(*(post(session, urls[i % len(urls)], FLOODER, f"c-{i}") for i in range(count)))
        statuses = sorted({a.status for a in answers})
        assert statuses == [200, 429]
        refused = [a for a in answers if a.status == 429]
        assert all(a.code == CONCURRENCY_LIMITED and a.retry_after == "1" for a in refused)
        peaks = [await metric(session, u, "inferplan_key_in_flight_peak", tier="paid") for u in urls]
        assert max(peaks) == cap  # reached, never passed (with Redis: counted across both instances)
        served = sum(a.status == 200 for a in answers)
        assert cap <= served < count
        # Every slot was given back: a full cap's worth at once is admitted again.
        await asyncio.sleep(0.2)  # the shared limiter frees its Redis entries just after the answers leave
        again = await asyncio.gather(*(post(session, urls[i % len(urls)], FLOODER, f"d-{i}") for i in range(cap)))
        assert all(a.status == 200 for a in again)


async def test_max_in_flight_holds_under_500_concurrent_requests_of_one_key(tmp_path):
    with running_server("--keys", limited_keys(tmp_path, max_in_flight=200)) as srv:
        await in_flight_burst([srv.url], cap=200, count=500)
        assert srv.terminate() == 0


@pytest.mark.redis
async def test_max_in_flight_holds_across_two_instances_sharing_redis(tmp_path):
    keys = limited_keys(tmp_path, max_in_flight=200)
    with redis_server() as redis, contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server("--redis", redis.url, "--keys", keys)) for _ in range(2)]
        await in_flight_burst([s.url for s in servers], cap=200, count=500)
