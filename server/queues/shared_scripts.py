"""The shared queue's atomic steps, as Lua scripts that Redis runs one at a time.

Each step that reads and then writes shared state (admit-and-queue, check-due-and-take,
reap the batches of dead instances) is one script, so two instances can never both
take the same request or both admit past a threshold. Times are Redis's own clock
(``TIME``), so instances on different machines agree on when a batch is due.

Queue entries are strings ``"<arrival ms>|<json payload>"``; the payload is
``[owner instance, request id, tier, timeout ms, request]`` (the request as
``Generate.to_wire()``: its input and, when given, its length). The arrival stamp comes
first so the due check reads it with one pattern match instead of a JSON decode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "ASSEMBLE",
    "ENQUEUE",
    "HEARTBEAT",
    "KEY_ADMIT",
    "RELEASE",
    "AssembleReply",
    "Assembled",
    "HeartbeatReply",
    "ReplyMessage",
    "SharedKeys",
    "admitted_depth",
]


@dataclass(frozen=True)
class SharedKeys:
    """Every Redis key one deployment uses, under one prefix (several deployments can share a Redis)."""

    prefix: str = "infer-plan"

    @property
    def queues(self) -> list[str]:
        """One list per tier, in priority order (enterprise, paid, free)."""
        return [f"{self.prefix}:queue:{tier}" for tier in range(3)]

    @property
    def lock(self) -> str:
        return f"{self.prefix}:batch_lock"

    @property
    def inflight(self) -> str:
        """Hash: batch id ("<instance>#<n>") -> JSON list of its entries (the lease)."""
        return f"{self.prefix}:inflight"

    @property
    def instances(self) -> str:
        """Sorted set: instance -> liveness deadline (ms); a batch's lease lives as long as its runner."""
        return f"{self.prefix}:instances"

    @property
    def gpus(self) -> str:
        """Hash: instance -> its GPU workers; the sum sets the shared backpressure thresholds."""
        return f"{self.prefix}:gpus"

    @property
    def wake(self) -> str:
        """Channel: "a batch may be due" or "the lock was released"; wakes every instance's assembler."""
        return f"{self.prefix}:wake"

    def key_bucket(self, key_id: str) -> str:
        """Hash of one API key's token bucket: tokens, updated (ms); ``key_id`` is a digest, never the key."""
        return f"{self.prefix}:key:{key_id}:bucket"

    def key_in_flight(self, key_id: str) -> str:
        """Sorted set of one API key's unanswered requests -> the ms their entry expires (a dead instance's leave)."""
        return f"{self.prefix}:key:{key_id}:inflight"

    def reply(self, instance: str) -> str:
        """Channel of one instance: outputs of its requests, run by whichever instance took the batch."""
        return f"{self.prefix}:reply:{instance}"


_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: queue0, queue1, queue2, wake channel
# ARGV: tier, payload, yellow, red, full (the zone bounds of core.admission), max_batch
# core.admission.zone_admits on the shared depth, held to it by tests/core/test_rule_tables.py.
# Returns the shared depth after queueing, or -1 when the tier is shed at the current depth.
ENQUEUE = (
    _NOW_MS
    + """
local depth = redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])
local tier = tonumber(ARGV[1])
local lowest = -1
if depth < tonumber(ARGV[3]) then lowest = 2
elseif depth < tonumber(ARGV[4]) then lowest = 1
elseif depth < tonumber(ARGV[5]) then lowest = 0 end
if tier > lowest then return -1 end
redis.call('RPUSH', KEYS[tier + 1], string.format('%d', now) .. '|' .. ARGV[2])
depth = depth + 1
if depth == 1 or depth == tonumber(ARGV[6]) then redis.call('PUBLISH', KEYS[4], 'queued') end
return depth
"""
)

# KEYS: lock, queue0, queue1, queue2, inflight, wake channel
# ARGV: owner, max_batch, max_wait_ms, lock_px, batch_id
# core.dispatch.decide and take_by_priority, in Lua because they must be atomic with the
# pops, held to them by tests/core/test_rule_tables.py: take a batch when max_batch are
# queued or the oldest has waited max_wait_ms, by tier. Only the lock's owner may take
# one; taking it records the lease and releases the lock. Returns {'batch', now, entries},
# {'wait', ms until due or -1 when empty, now} (lock extended), or {'lost'}.
ASSEMBLE = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lost'} end
"""
    + _NOW_MS
    + """
local total = 0
local oldest = nil
for i = 2, 4 do
  local n = redis.call('LLEN', KEYS[i])
  if n > 0 then
    total = total + n
    local stamp = tonumber(string.match(redis.call('LINDEX', KEYS[i], 0), '^(%d+)|'))
    if oldest == nil or stamp < oldest then oldest = stamp end
  end
end
local max_batch = tonumber(ARGV[2])
if total == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'wait', -1, now}
end
local remaining = oldest + tonumber(ARGV[3]) - now
if total < max_batch and remaining > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'wait', remaining, now}
end
local batch = {}
for i = 2, 4 do
  if #batch < max_batch then
    local got = redis.call('LPOP', KEYS[i], max_batch - #batch)
    if got then
      for _, entry in ipairs(got) do batch[#batch + 1] = entry end
    end
  end
end
redis.call('HSET', KEYS[5], ARGV[5], cjson.encode(batch))
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', KEYS[6], 'released')
return {'batch', now, batch}
"""
)

# KEYS: the key's bucket hash, the key's in-flight sorted set
# ARGV: rps, burst, max_in_flight ('' for no limit of that kind), member, ttl_ms
# core.key_limits.bucket_take and the in-flight cap, atomic across instances, held to the
# Python rule by tests/core/test_rule_tables.py. The cap is checked first, so a request
# refused for it takes no token; in-flight entries expire after ttl_ms, so the requests
# of an instance that died free their key's slots. Returns {'ok', in flight now},
# {'concurrency', in flight now} or {'rate', seconds until a token as a string}.
KEY_ADMIT = (
    _NOW_MS
    + """
local cap = tonumber(ARGV[3])
local in_flight = 0
if cap then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= cap then return {'concurrency', in_flight} end
end
local rps = tonumber(ARGV[1])
if rps then
  local burst = tonumber(ARGV[2])
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
  local tokens = tonumber(state[1]) or burst
  local updated = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rps / 1000)
  if tokens < 1 then return {'rate', string.format('%.6f', (1 - tokens) / rps)} end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens - 1), 'updated', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rps * 1000) + 60000)
end
if cap then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]) + 60000)
  in_flight = in_flight + 1
end
return {'ok', in_flight}
"""
)

# KEYS: lock.  ARGV: owner.  Deletes the lock only if this owner still holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: instances, gpus, inflight, queue0, queue1, queue2
# ARGV: instance, its gpus, ttl_ms
# Renews this instance, forgets instances whose deadline passed, and puts the entries of
# batches whose runner is gone back at the head of their tier queue (unless their owner
# is gone too or their deadline passed: nobody is waiting for those any more).
# Returns {GPUs of all live instances, entries requeued, entries dropped}.
HEARTBEAT = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('HDEL', KEYS[2], gone)
end
local requeued, dropped = 0, 0
for _, batch_id in ipairs(redis.call('HKEYS', KEYS[3])) do
  local runner = string.match(batch_id, '^(.*)#')
  if not redis.call('ZSCORE', KEYS[1], runner) then
    local entries = cjson.decode(redis.call('HGET', KEYS[3], batch_id))
    for i = #entries, 1, -1 do
      local stamp, payload = string.match(entries[i], '^(%d+)|(.*)$')
      local p = cjson.decode(payload)
      if redis.call('ZSCORE', KEYS[1], p[1]) and tonumber(stamp) + p[4] > now then
        redis.call('LPUSH', KEYS[4 + p[3]], entries[i])
        requeued = requeued + 1
      else
        dropped = dropped + 1
      end
    end
    redis.call('HDEL', KEYS[3], batch_id)
  end
end
local gpus = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do gpus = gpus + tonumber(n) end
return {gpus, requeued, dropped}
"""
)


def admitted_depth(reply: int) -> int | None:
    """ENQUEUE's reply: the shared depth after queueing, or None when the tier was shed."""
    depth = int(reply)
    return None if depth < 0 else depth


class Assembled(Enum):
    """What ASSEMBLE did for the lock holder."""

    LOST = "lost"  # the lock expired under us; someone else may hold it
    WAIT = "wait"  # nothing due yet; the lock was extended
    TAKEN = "batch"  # a batch was popped, leased and the lock released


@dataclass(frozen=True, slots=True)
class AssembleReply:
    outcome: Assembled
    now_ms: int = 0  # Redis's clock when the script ran
    wait_ms: float = math.inf  # WAIT: until the oldest request is due; inf: the queues are empty
    entries: list[str] = field(default_factory=list)  # TAKEN: the queue entries, by priority

    @classmethod
    def parse(cls, raw: list) -> AssembleReply:
        outcome = Assembled(raw[0])
        if outcome is Assembled.WAIT:
            remaining = int(raw[1])
            return cls(outcome, int(raw[2]), math.inf if remaining < 0 else float(remaining))
        if outcome is Assembled.TAKEN:
            return cls(outcome, int(raw[1]), entries=list(raw[2]))
        return cls(outcome)


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    gpus: int  # GPU workers of all live instances: the shared zones' size
    requeued: int  # entries of dead instances' batches put back at the head of their tier
    dropped: int  # entries whose owner is gone too or whose deadline passed

    @classmethod
    def parse(cls, raw: list) -> HeartbeatReply:
        return cls(*(int(x) for x in raw))


@dataclass(frozen=True, slots=True)
class ReplyMessage:
    """Answers for one owner instance from one batch, published on its reply channel."""

    ids: list[str]
    outputs: list[dict | None]  # answers as Generated.to_wire(); None for every request when the batch failed
    error: dict | None = None  # status, code, message, retry_after_s of the batch's ApiError

    def to_json(self) -> str:
        return json.dumps({"ids": self.ids, "outputs": self.outputs, "error": self.error})

    @classmethod
    def from_json(cls, data: str) -> ReplyMessage:
        message = json.loads(data)
        return cls(message["ids"], message["outputs"], message.get("error"))
