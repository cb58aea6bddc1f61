"""Per-key limits at admission: the token bucket and the in-flight cap of :mod:`infer_plan.core.key_limits`.

The gateway asks :meth:`KeyLimiter.admit` after it has authenticated and validated a
request and before it queues it; a key over its limit gets 429 with ``Retry-After``
and a code of its own (``key_rate_limited``, ``key_concurrency_limited``) and costs
the queue nothing. An admitted request holds its in-flight slot until the handler
returns, which for a streamed answer is when its stream ends.

:class:`LocalKeyLimiter` keeps the state in this process; :class:`SharedKeyLimiter`
keeps it in the Redis the instances share (``serve --redis``), one atomic script per
admission of a limited key, so the limits hold for the service, not per instance.
Keys without limits never reach either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from ...core.key_limits import bucket_take, retry_after_header
from ...core.tiers import Tier
from ..api_errors import ApiError
from ..metrics import ServerMetrics
from ..queues.shared_scripts import KEY_ADMIT, SharedKeys
from .keys import KeyGrant

__all__ = ["KeyLimiter", "LocalKeyLimiter", "SharedKeyLimiter", "Slot"]

log = logging.getLogger("infer_plan.server")

Slot = tuple[str, str] | None  # (key id, in-flight member) held by an admitted request; None: nothing to give back
RATE_LIMITED = "key_rate_limited"
CONCURRENCY_LIMITED = "key_concurrency_limited"


class KeyLimiter(ABC):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._peaks = [0] * len(Tier)

    async def admit(self, grant: KeyGrant) -> Slot:
        """Admit one request of the key, or raise the 429 that says which limit it is over."""
        if not grant.limits.limited:
            return None
        return await self._admit(grant)

    @abstractmethod
    async def _admit(self, grant: KeyGrant) -> Slot: ...

    @abstractmethod
    def release(self, slot: Slot) -> None:
        """The request's answer is complete (or failed): its key may have one more in flight."""

    async def close(self) -> None:  # noqa: B027  (the local limiter holds nothing outside this process)
        """Finish what admissions and releases left under way."""

    def _refuse(self, grant: KeyGrant, reason: str, retry_after_s: float) -> ApiError:
        self.metrics.rejected.labels(grant.tier.label, reason).inc()
        limits = grant.limits
        if reason == RATE_LIMITED:
            message = (
                f"this key's rate limit ({limits.rps:g} req/s, burst {limits.burst:g}) is spent; "
                f"next token in {retry_after_s:.3f} s"
            )
        else:
            message = f"this key already has {limits.max_in_flight} requests in flight (its max_in_flight)"
        return ApiError(429, message, code=reason, retry_after_s=retry_after_header(retry_after_s))

    def _note_in_flight(self, tier: Tier, in_flight: int) -> None:
        if in_flight > self._peaks[tier]:
            self._peaks[tier] = in_flight
            self.metrics.key_in_flight_peak.labels(tier.label).set(in_flight)


class LocalKeyLimiter(KeyLimiter):
    """The limits of one server process, in its memory."""

    def __init__(self, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(metrics)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, updated)
        self._in_flight: dict[str, int] = {}

    async def _admit(self, grant: KeyGrant) -> Slot:
        limits, key_id = grant.limits, grant.key_id
        in_flight = self._in_flight.get(key_id, 0)
        if limits.max_in_flight is not None and in_flight >= limits.max_in_flight:
            raise self._refuse(grant, CONCURRENCY_LIMITED, 1.0)
        if limits.rps is not None:
            assert limits.burst is not None  # KeyLimits sets it with rps
            now = self.clock()
            tokens, updated = self._buckets.get(key_id, (limits.burst, now))
            took = bucket_take(tokens, updated, now, limits.rps, limits.burst)
            if not took.admitted:
                raise self._refuse(grant, RATE_LIMITED, took.retry_after_s)
            self._buckets[key_id] = (took.tokens, now)
        if limits.max_in_flight is None:
            return None
        self._in_flight[key_id] = in_flight + 1
        self._note_in_flight(grant.tier, in_flight + 1)
        return key_id, ""

    def release(self, slot: Slot) -> None:
        if slot is None:
            return
        key_id = slot[0]
        left = self._in_flight[key_id] - 1
        if left:
            self._in_flight[key_id] = left
        else:
            del self._in_flight[key_id]


class SharedKeyLimiter(KeyLimiter):
    """The limits of every instance sharing one Redis; the state lives under the deployment's prefix."""

    def __init__(
        self, metrics: ServerMetrics, client: aioredis.Redis, keys: SharedKeys, instance: str, ttl_s: float
    ) -> None:
        super().__init__(metrics)
        self.client = client
        self.keys = keys
        self.instance = instance
        self.ttl_ms = int(ttl_s * 1000) + 5000  # an entry outlives its request's deadline by the delivery's slack
        self._script = client.register_script(KEY_ADMIT)
        self._members = itertools.count(1)
        self._releases: set[asyncio.Task] = set()

    async def _admit(self, grant: KeyGrant) -> Slot:
        limits = grant.limits
        member = f"{self.instance}#{next(self._members)}"
        args = [_arg(limits.rps), _arg(limits.burst), _arg(limits.max_in_flight), member, self.ttl_ms]
        keys = [self.keys.key_bucket(grant.key_id), self.keys.key_in_flight(grant.key_id)]
        try:
            try:
                outcome, value = await self._script(keys=keys, args=args)
            except NoScriptError:  # redis-py reloads it on the next call; a Redis restart emptied its cache
                outcome, value = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as err:
            raise ApiError(503, f"key limits unavailable: {err}", code="queue_unavailable", retry_after_s=1) from None
        if outcome == "rate":
            raise self._refuse(grant, RATE_LIMITED, float(value))
        if outcome == "concurrency":
            raise self._refuse(grant, CONCURRENCY_LIMITED, 1.0)
        if limits.max_in_flight is None:
            return None
        self._note_in_flight(grant.tier, int(value))
        return grant.key_id, member

    def release(self, slot: Slot) -> None:
        if slot is None:
            return
        task = asyncio.get_running_loop().create_task(self._release(*slot))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, key_id: str, member: str) -> None:
        try:
            await self.client.zrem(self.keys.key_in_flight(key_id), member)
        except (RedisError, OSError) as err:  # the entry expires after ttl_ms anyway
            log.warning("could not free a key's in-flight slot in Redis (it expires by itself): %s", err)

    async def close(self) -> None:
        """Let the releases already sent finish, so a draining instance leaves no slot held."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._releases, return_exceptions=True)


def _arg(value: float | int | None) -> str:
    return "" if value is None else repr(value)
