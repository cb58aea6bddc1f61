"""The autoscaler's inputs across instances that share one Redis (``serve --redis`` with autoscaling).

Several instances serve one deployment; the rule must see the deployment's offered load
and fleet, and one instance must act on it, or a spike orders a GPU per instance. At
every tick (wall-clock aligned, so every instance has the same tick index) each
instance adds its own arrivals of the tick to ``scale:offered:<tick>`` and writes its
GPUs (serving plus provisioning) into ``scale:fleet``. The instance that holds
``scale:leader`` (``SET NX PX``, renewed by its holder each tick; it passes to another
instance within two ticks of the holder's death) waits a moment for the others' counts,
reads the totals over live instances, decides, and provisions or releases in its own
process. The rule's clock (since when the load has been above or below its triggers)
lives in ``scale:clock``, so a new leader continues where the old one stopped; times are
tick indices past a shared ``scale:anchor``, so every instance counts the same seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from redis.exceptions import RedisError

from ...core.autoscale import ScaleClock
from .shared_queue import SharedQueue

__all__ = ["SharedScaleLedger"]

GATHER_S = 0.15  # the leader waits this long after a tick for the other instances' counts of it
TTL_S = 120  # a tick's count is kept this long

# KEYS: leader; ARGV: instance, ttl_ms. 1 when this instance leads (it held the lock, or took a free one).
LEAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


class SharedScaleLedger:
    """The rule's inputs summed over the instances of a shared queue; one of them decides each tick."""

    def __init__(self, queue: SharedQueue, tick_s: float) -> None:
        self.queue = queue
        self.tick_s = tick_s
        self.prefix = f"{queue.keys.prefix}:scale"
        self._lead = queue.client.register_script(LEAD)
        self.anchor: int | None = None

    async def start(self, tick: int) -> int:
        """The shared tick index every instance counts from (the first instance's first tick)."""
        client = self.queue.client
        await client.set(f"{self.prefix}:anchor", tick, nx=True)
        self.anchor = int(await client.get(f"{self.prefix}:anchor"))
        return self.anchor

    async def tick(self, tick: int, arrived: int, fleet: int) -> tuple[int, int] | None:
        """Count this instance's tick; the deployment's (arrivals, GPUs) when this instance decides, else None."""
        client, me = self.queue.client, self.queue.instance
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incrby(f"{self.prefix}:offered:{tick}", arrived)
                pipe.expire(f"{self.prefix}:offered:{tick}", TTL_S)
                pipe.hset(f"{self.prefix}:fleet", me, fleet)
                await pipe.execute()
            if not await self._lead(keys=[f"{self.prefix}:leader"], args=[me, int(2000 * self.tick_s)]):
                return None
            await asyncio.sleep(GATHER_S)
            offered = int(await client.get(f"{self.prefix}:offered:{tick}") or 0)
            fleets = await client.hgetall(f"{self.prefix}:fleet")
            live = set(await client.zrangebyscore(self.queue.keys.instances, "(0", "+inf"))
        except (RedisError, OSError):
            return None  # Redis is away: nobody decides this tick (the queue answers 503 meanwhile)
        for gone in set(fleets) - live - {me}:
            del fleets[gone]
        return offered, sum(int(n) for n in fleets.values())

    async def clock(self) -> ScaleClock:
        try:
            raw = await self.queue.client.get(f"{self.prefix}:clock")
        except (RedisError, OSError):
            return ScaleClock()
        return ScaleClock(**json.loads(raw)) if raw else ScaleClock()

    async def keep(self, clock: ScaleClock) -> None:
        fields = {"above_since": clock.above_since, "below_since": clock.below_since,
                  "longest_above_s": clock.longest_above_s}  # fmt: skip
        with contextlib.suppress(RedisError, OSError):  # lost: the next leader starts its clocks afresh
            await self.queue.client.set(f"{self.prefix}:clock", json.dumps(fields), ex=TTL_S)
