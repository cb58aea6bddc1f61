"""One table of cases for each rule, run against the Python rule and against its Lua copy in a real redis-server.

The shared queue must decide inside Redis (atomically with the pops), so the dispatch
decision, the admission zones and the per-key token bucket exist twice: once in :mod:`infer_plan.core` and once
as Lua in :mod:`infer_plan.server.queues.shared_scripts`. These tables are what holds the two
together; a case added here is checked against both.
"""

from __future__ import annotations

import json
import math

import pytest
import redis
from infer_plan.core import DispatchRule, Take, decide, take_by_priority
from infer_plan.core.admission import zone_admits
from infer_plan.core.key_limits import bucket_take
from infer_plan.loadtests.target import redis_server
from infer_plan.server.queues.shared_scripts import (
    ASSEMBLE,
    ENQUEUE,
    KEY_ADMIT,
    Assembled,
    AssembleReply,
    SharedKeys,
    admitted_depth,
)

# Queue contents as ages in ms per tier (enterprise, paid, free), oldest first; the rule's
# max_batch and max_wait_ms; and what must happen: take (per-tier counts) or wait (ms; inf: empty).
# Ages sit far from the deadlines, so the few ms a script takes to run cannot flip a case.
DISPATCH_CASES = [
    ("empty", ([], [], []), 100, 1000, ("wait", math.inf)),
    ("lone request, not due", ([], [], [0]), 100, 10_000, ("wait", 10_000)),
    ("lone request, due", ([], [], [5_000]), 100, 1000, ("take", (0, 0, 1))),
    ("due by its oldest, in any tier", ([0], [], [5_000]), 100, 1000, ("take", (1, 0, 1))),
    ("not due: the oldest decides", ([3_000], [2_000], [1_000]), 100, 10_000, ("wait", 7_000)),
    ("full batch leaves at once", ([0], [0], [0, 0]), 4, 60_000, ("take", (1, 1, 2))),
    ("over full: enterprise, then paid", ([0, 0, 0], [0, 0, 0], [0, 0, 0]), 4, 60_000, ("take", (3, 1, 0))),
    ("one tier fills it", ([], [0] * 5, [0] * 2), 5, 60_000, ("take", (0, 5, 0))),
    ("no wait at all", ([], [0], []), 100, 0, ("take", (0, 1, 0))),
    ("due and over full", ([9_000] * 2, [9_000] * 2, [9_000] * 2), 3, 1000, ("take", (2, 1, 0))),
]

# Shared depth, the arriving request's tier, the zone bounds (yellow, red, full): admitted?
THRESHOLDS = (4, 6, 8)
ZONE_CASES = [
    (depth, tier, THRESHOLDS, zone_admits(tier, depth, THRESHOLDS))
    for depth in (0, 3, 4, 5, 6, 7, 8, 9)
    for tier in (0, 1, 2)
]
ZONE_EXPECTED = {  # the same table written out by hand, so the Python rule is checked too
    0: (True, True, True),
    3: (True, True, True),
    4: (True, True, False),
    5: (True, True, False),
    6: (True, False, False),
    7: (True, False, False),
    8: (False, False, False),
    9: (False, False, False),
}


def python_dispatch(ages: tuple[list[int], ...], max_batch: int, max_wait_ms: int) -> tuple:
    now = 100.0
    queued = sum(len(a) for a in ages)
    oldest = now - max((age for a in ages for age in a), default=-math.inf) / 1000.0
    decision = decide(DispatchRule(max_batch, max_wait_ms / 1000.0), queued, oldest, now, gpu_free=True)
    if isinstance(decision, Take):
        return "take", tuple(take_by_priority([len(a) for a in ages], decision.n))
    return "wait", (decision.until - now) * 1000.0


@pytest.mark.parametrize(("name", "ages", "max_batch", "max_wait_ms", "expected"), DISPATCH_CASES)
def test_dispatch_table_against_python(name, ages, max_batch, max_wait_ms, expected):
    kind, value = python_dispatch(ages, max_batch, max_wait_ms)
    assert kind == expected[0], name
    assert value == pytest.approx(expected[1]) if kind == "wait" else value == expected[1]


def test_zone_table_is_the_hand_written_one():
    for depth, tier, _, admitted in ZONE_CASES:
        assert admitted == ZONE_EXPECTED[depth][tier], (depth, tier)


@pytest.fixture(scope="module")
def client():
    with redis_server() as server, redis.Redis(port=server.port, decode_responses=True) as conn:
        yield conn


def _entry(stamp_ms: int, tier: int, i: int) -> str:
    return f"{stamp_ms}|{json.dumps(['owner', str(i), tier, 600_000, f'text-{i}'])}"


@pytest.mark.redis
@pytest.mark.parametrize(("name", "ages", "max_batch", "max_wait_ms", "expected"), DISPATCH_CASES)
def test_dispatch_table_against_lua(client, name, ages, max_batch, max_wait_ms, expected):
    keys = SharedKeys(f"case:{name}")
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    for tier, tier_ages in enumerate(ages):
        for i, age in enumerate(tier_ages):
            client.rpush(keys.queues[tier], _entry(now_ms - age, tier, i))
    client.set(keys.lock, "me", px=60_000)
    raw = client.register_script(ASSEMBLE)(
        keys=[keys.lock, *keys.queues, keys.inflight, keys.wake], args=["me", max_batch, max_wait_ms, 60_000, "b#1"]
    )
    reply = AssembleReply.parse(raw)
    if expected[0] == "take":
        assert reply.outcome is Assembled.TAKEN, name
        tiers = [json.loads(entry.partition("|")[2])[2] for entry in reply.entries]
        assert tuple(tiers.count(t) for t in range(3)) == expected[1], name
        assert tiers == sorted(tiers), "taken by priority"
        assert client.get(keys.lock) is None and client.hexists(keys.inflight, "b#1"), "leased, lock released"
    else:
        assert reply.outcome is Assembled.WAIT, name
        if math.isinf(expected[1]):
            assert math.isinf(reply.wait_ms), name
        else:
            assert expected[1] - 500 <= reply.wait_ms <= expected[1], (name, reply.wait_ms)
        assert client.get(keys.lock) == "me", "the holder keeps the lock while it waits"


@pytest.mark.redis
@pytest.mark.parametrize(("depth", "tier", "thresholds", "admitted"), ZONE_CASES)
def test_zone_table_against_lua(client, depth, tier, thresholds, admitted):
    keys = SharedKeys(f"zone-{depth}-{tier}")
    for i in range(depth):
        client.rpush(keys.queues[i % 3], _entry(0, i % 3, i))  # the zones read the total over all tiers
    raw = client.register_script(ENQUEUE)(keys=[*keys.queues, keys.wake], args=[tier, "payload", *thresholds, 100])
    depth_after = admitted_depth(raw)
    assert (depth_after is not None) == admitted
    assert depth_after in (None, depth + 1)
    assert sum(client.llen(k) for k in keys.queues) == depth + admitted


# A key's bucket (tokens left, ms since it was last taken from; None: a new key), its rps
# and burst, the cap on in flight and how many are: admitted? and if refused, why.
BUCKET_CASES = [
    ("new key", (None, 0), 10.0, 5.0, None, 0, ("ok", 0.0)),
    ("last token", (1.0, 0), 10.0, 5.0, None, 0, ("ok", 0.0)),
    ("empty, refills soon", (0.0, 20), 10.0, 5.0, None, 0, ("rate", 0.08)),
    ("empty, refilled", (0.0, 5_000), 10.0, 5.0, None, 0, ("ok", 0.0)),
    ("slow key", (0.5, 0), 0.1, 1.0, None, 0, ("rate", 5.0)),
    ("full cap comes first", (None, 0), 10.0, 5.0, 3, 3, ("concurrency", 0.0)),
    ("room under the cap", (None, 0), None, None, 3, 2, ("ok", 0.0)),
    ("cap only, no rate", (None, 0), None, None, 1, 0, ("ok", 0.0)),
]


def python_key_admit(bucket, rps, burst, cap, in_flight) -> tuple[str, float]:
    if cap is not None and in_flight >= cap:
        return "concurrency", 0.0
    if rps is None:
        return "ok", 0.0
    tokens, age_ms = bucket
    took = bucket_take(burst if tokens is None else tokens, -age_ms / 1000.0, 0.0, rps, burst)
    return ("ok", 0.0) if took.admitted else ("rate", took.retry_after_s)


@pytest.mark.parametrize(("name", "bucket", "rps", "burst", "cap", "in_flight", "expected"), BUCKET_CASES)
def test_key_limit_table_against_python(name, bucket, rps, burst, cap, in_flight, expected):
    kind, retry = python_key_admit(bucket, rps, burst, cap, in_flight)
    assert kind == expected[0], name
    assert retry == pytest.approx(expected[1]), name


@pytest.mark.redis
@pytest.mark.parametrize(("name", "bucket", "rps", "burst", "cap", "in_flight", "expected"), BUCKET_CASES)
def test_key_limit_table_against_lua(client, name, bucket, rps, burst, cap, in_flight, expected):
    keys, key_id = SharedKeys(f"bucket:{name}"), "k"
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    tokens, age_ms = bucket
    if tokens is not None:
        client.hset(keys.key_bucket(key_id), mapping={"tokens": tokens, "updated": now_ms - age_ms})
    for i in range(in_flight):
        client.zadd(keys.key_in_flight(key_id), {f"other#{i}": now_ms + 60_000})
    client.zadd(keys.key_in_flight(key_id), {"expired#1": now_ms - 1})  # an entry a dead instance left
    args = ["" if v is None else repr(v) for v in (rps, burst, cap)]
    kind, value = client.register_script(KEY_ADMIT)(
        keys=[keys.key_bucket(key_id), keys.key_in_flight(key_id)], args=[*args, "me#1", 60_000]
    )
    assert kind == expected[0], name
    if kind == "rate":
        assert float(value) == pytest.approx(expected[1], abs=0.01), name  # the script runs a few ms later
    admitted_here = kind == "ok" and cap is not None
    assert client.zscore(keys.key_in_flight(key_id), "me#1") is not None if admitted_here else True
    if cap is not None:
        assert int(value) == in_flight + admitted_here  # the expired entry no longer counts
