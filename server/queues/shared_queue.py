"""Tier queues shared in Redis, so several server processes act as one service (``serve --redis URL``).

Every instance admits requests into the same per-tier Redis lists (backpressure on the
shared depth, so all instances shed the same tiers at the same moment). Free GPUs of
all instances take turns assembling: the one holding ``batch_lock`` (``SET NX PX 50``)
waits until the batch is due by the dispatch rule and takes it; the lock is extended
while it waits and released by its owner only. The batch runs on the taking
instance's GPU workers; each output goes back on the reply channel of the instance
that holds the client's connection (its own requests are answered directly).

What keeps a request from being lost or stuck:
- a taken batch is recorded as a lease; if its runner stops heart-beating, any other
  instance puts its entries back at the head of their tiers (the batch runs again);
- the lock expires 50 ms after a dead holder's last extension;
- every entry carries its deadline; nobody runs or requeues an entry whose client has
  already been answered 504;
- when Redis cannot be reached, new requests get 503 at once, waiting ones get 503
  (their replies may be lost), and the instance resumes by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ...core.model import ServiceModel
from ..api_errors import ApiError
from ..backends.base import Generate, Generated
from ..metrics import ServerMetrics
from .memory_queue import Pending
from .queue import Interrupted, TierQueue
from .shared_scripts import (
    ASSEMBLE,
    ENQUEUE,
    HEARTBEAT,
    RELEASE,
    Assembled,
    AssembleReply,
    HeartbeatReply,
    ReplyMessage,
    SharedKeys,
    admitted_depth,
)

__all__ = ["Link", "SharedQueue"]

log = logging.getLogger("infer_plan.server.shared")

LOCK_PX = 50  # ms: the lock outlives a dead holder by at most this (SPEC section 4)
EXTEND_S = 0.02  # the holder extends the lock (and re-checks the queues) at least this often
LOCK_POLL_S = 0.01  # a GPU waiting for the lock retries this often unless woken by its release
HEARTBEAT_S = 0.5
INSTANCE_TTL_MS = 2000  # an instance silent this long is dead: its leases are reclaimed
COMMAND_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 32
STARTUP_WAIT_S = 3.0


class Link(Enum):
    """The state of one of the two long-lived exchanges with Redis (the reply subscription, the heartbeat)."""

    CONNECTING = "connecting"
    UP = "up"
    LOST = "lost"


@dataclass(slots=True)
class TakenEntry:
    """A request in a batch this instance took from Redis; its owner may be another instance."""

    owner: str
    request_id: str
    request: Generate
    batch_id: str


class SharedQueue(TierQueue):
    """The tier queues in Redis; ``pending`` holds this instance's own waiting requests (their futures)."""

    def __init__(self, model: ServiceModel, gpus: int, metrics: ServerMetrics, *, url: str, prefix: str) -> None:
        self.gpus = gpus
        self.model = model
        self.metrics = metrics
        self.max_batch = model.max_batch
        self.timeout_ms = int(model.request_timeout_s * 1000)
        self.thresholds = model.backpressure.thresholds(gpus, model.max_batch)
        self.url = url
        self.keys = SharedKeys(prefix)
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}".replace("#", "-")
        # No silent retries: a command that fails must surface at once, so the caller answers 503.
        # A bounded pool: a burst of requests waits for a connection instead of opening thousands.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=COMMAND_TIMEOUT_S,
            decode_responses=True,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._enqueue = self.client.register_script(ENQUEUE)
        self._assemble = self.client.register_script(ASSEMBLE)
        self._release = self.client.register_script(RELEASE)
        self._heartbeat = self.client.register_script(HEARTBEAT)
        self.pending: dict[str, Pending] = {}
        self._request_ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self.replies = Link.CONNECTING
        self.heartbeat = Link.CONNECTING
        self.outage: str | None = "connecting to Redis"  # why Redis failed us last; None while serving
        self.draining = False
        self._assembly = asyncio.Lock()  # one GPU of this instance competes for the Redis lock at a time
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._outbox: list[tuple[list[object], asyncio.Future[int]]] = []  # enqueues of this loop pass
        self._flushing: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening and heart-beating, and give Redis a moment so the first clients are not refused.

        A Redis that is down does not stop the server: it answers 503 until Redis is back.
        """
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-replies"),
            asyncio.create_task(self._beat(), name="redis-heartbeat"),
        ]
        deadline = asyncio.get_running_loop().time() + STARTUP_WAIT_S
        while self.unavailable is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self.unavailable is not None:
            log.error("%s; serving 503 until Redis at %s answers", self.unavailable, self.url)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending("this instance stopped")
        with contextlib.suppress(RedisError, OSError):  # leaving now frees our GPUs from the shared thresholds
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self.keys.instances, self.instance)
                pipe.hdel(self.keys.gpus, self.instance)
                await pipe.execute()
        await self.client.aclose()

    @property
    def queued(self) -> int:
        return len(self.pending)

    def drain(self) -> None:
        """Keep taking shared batches only while requests of ours wait, so the drain ends."""
        self.draining = True

    @property
    def unavailable(self) -> str | None:
        if self.replies is Link.UP and self.heartbeat is Link.UP:
            return None
        return f"shared queue unavailable: {self.outage or 'connecting to Redis'}"

    async def depths(self) -> list[int]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in self.keys.queues:
                    pipe.llen(key)
                return [int(n) for n in await pipe.execute()]
        except (RedisError, OSError):
            return [0, 0, 0]

    # -- request side ---------------------------------------------------------------------

    async def offer(self, request: Generate, tier: int) -> asyncio.Future[Generated] | None:
        if (why := self.unavailable) is not None:
            raise _unavailable(why)
        loop = asyncio.get_running_loop()
        request_id = str(next(self._request_ids))
        future: asyncio.Future[Generated] = loop.create_future()
        self.pending[request_id] = Pending(request, tier, loop.time(), future)
        future.add_done_callback(lambda _, rid=request_id: self.pending.pop(rid, None))
        payload = json.dumps([self.instance, request_id, int(tier), self.timeout_ms, request.to_wire()])
        try:
            depth = admitted_depth(await self._send_enqueue([int(tier), payload, *self.thresholds, self.max_batch]))
        except (RedisError, OSError) as err:
            future.cancel()
            self._lost(err)
            raise _unavailable(self.unavailable or str(err)) from None
        if depth is None:
            future.cancel()
            return None
        if depth == 1 or depth >= self.max_batch:
            self._wake.set()
        return future

    async def _send_enqueue(self, args: list[object]) -> int:
        """Run ENQUEUE for one request; every request offered in the same loop pass shares one round trip."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._outbox.append((args, done))
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        return await done

    def _flush_outbox(self) -> None:
        batch, self._outbox = self._outbox, []
        task = asyncio.create_task(self._enqueue_many(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _enqueue_many(self, batch: list[tuple[list[object], asyncio.Future[int]]]) -> None:
        keys = [*self.keys.queues, self.keys.wake]
        results: list[object] = [RedisError("enqueue interrupted")] * len(batch)
        try:
            for attempt in range(2):
                async with self.client.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.evalsha(self._enqueue.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                    await self.client.script_load(ENQUEUE)  # Redis restarted since: its script cache is empty
                    continue
                break
        except (RedisError, OSError) as err:
            results = [err] * len(batch)
        except Exception as err:  # a bug of ours must still answer every waiting request
            log.exception("enqueue failed")
            results = [RedisError(f"enqueue failed: {err!r}")] * len(batch)
        finally:  # even when cancelled: no offer may wait on a future nobody will resolve
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(int(result))

    # -- assembly under the shared lock -----------------------------------------------------

    def resize(self, gpus: int) -> None:
        self.gpus = gpus  # the next heartbeat tells the other instances; the shared zones follow the pool's sum

    def wake(self) -> None:
        self._wake.set()

    async def next_batch(self, interrupted: Interrupted) -> list[TakenEntry] | None:
        async with self._assembly:
            while not interrupted():
                if self.unavailable is not None or (self.draining and not self.pending):
                    await asyncio.sleep(0.05)  # nothing to take: Redis is away, or we leave once ours are answered
                    continue
                try:
                    batch = await self._assemble_under_lock(interrupted)
                except (RedisError, OSError) as err:
                    self._lost(err)
                    await asyncio.sleep(0.05)  # a failing Redis is not retried in a tight loop
                    continue
                if batch:
                    return batch
            return None

    async def _assemble_under_lock(self, interrupted: Interrupted) -> list[TakenEntry] | None:
        self._wake.clear()
        if not await self.client.set(self.keys.lock, self.instance, nx=True, px=LOCK_PX):
            await self._sleep_or_wake(LOCK_POLL_S)  # the holder's release publishes a wake
            return None
        held = True
        try:
            while not interrupted():
                self._wake.clear()  # arrivals during the script set it again
                batch_id = f"{self.instance}#{next(self._batch_ids)}"
                reply = AssembleReply.parse(
                    await self._assemble(
                        keys=[self.keys.lock, *self.keys.queues, self.keys.inflight, self.keys.wake],
                        args=[self.instance, self.max_batch, self.model.max_wait_ms, LOCK_PX, batch_id],
                    )
                )
                if reply.outcome is Assembled.LOST:
                    held = False
                    return None
                if reply.outcome is Assembled.TAKEN:
                    held = False
                    return await self._unpack(batch_id, reply)
                await self._sleep_or_wake(min(reply.wait_ms / 1000, EXTEND_S))
            return None
        finally:
            if held:
                with contextlib.suppress(RedisError, OSError):
                    await self._release(keys=[self.keys.lock], args=[self.instance])

    async def _unpack(self, batch_id: str, reply: AssembleReply) -> list[TakenEntry]:
        """Entries to run; ones past their deadline were answered 504 by their owner and are skipped."""
        batch = []
        for entry in reply.entries:
            stamp, _, payload = entry.partition("|")
            owner, request_id, _tier, timeout_ms, wire = json.loads(payload)
            if int(stamp) + timeout_ms > reply.now_ms:
                batch.append(TakenEntry(owner, request_id, Generate.from_wire(wire), batch_id))
        if not batch:
            await self.client.hdel(self.keys.inflight, batch_id)
            return batch
        owners = {entry.owner for entry in batch}
        self.metrics.shared_remote.inc(sum(entry.owner != self.instance for entry in batch))
        if len(owners) > 1:
            self.metrics.shared_mixed.inc()
        return batch

    async def _sleep_or_wake(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    # -- delivery -------------------------------------------------------------------------

    async def deliver(self, batch: Sequence[TakenEntry], result: list[Generated] | ApiError) -> None:
        """Own requests are answered here; each other owner gets one message on its reply channel."""
        failed = isinstance(result, ApiError)
        error = result.to_dict() if failed else None
        remote: dict[str, ReplyMessage] = defaultdict(lambda: ReplyMessage([], [], error))
        for i, entry in enumerate(batch):
            answer = result if failed else result[i]
            if entry.owner == self.instance:
                self._resolve(entry.request_id, answer)
            else:
                message = remote[entry.owner]
                message.ids.append(entry.request_id)
                message.outputs.append(None if failed else answer.to_wire())
        await self._publish(batch[0].batch_id, remote)

    async def _publish(self, batch_id: str, messages: dict[str, ReplyMessage]) -> None:
        """Send each owner its answers and end the batch's lease, in one round trip.

        One failure may be a pooled connection that died with an earlier Redis while
        this one is up and the owners are listening: the answers are sent once more on
        a fresh connection (an owner ignores an answer it has had). Only when that fails
        too is Redis down, which the owners notice themselves and answer 503.
        """
        for attempt in range(2):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for owner, message in messages.items():
                        pipe.publish(self.keys.reply(owner), message.to_json())
                    pipe.hdel(self.keys.inflight, batch_id)
                    await pipe.execute()
                return
            except (RedisError, OSError) as err:
                if attempt == 1:
                    self._lost(err)

    def _resolve(self, request_id: str, result: Generated | ApiError) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is None or pending.future.done():
            return  # answered already (deadline, outage) or a re-run of a reclaimed batch
        if isinstance(result, ApiError):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    def _on_reply(self, data: str) -> None:
        message = ReplyMessage.from_json(data)
        err = None if message.error is None else ApiError.from_dict(message.error)
        for request_id, output in zip(message.ids, message.outputs, strict=True):
            self._resolve(request_id, err or Generated.from_wire(output))

    # -- background: replies, heartbeat, outages ------------------------------------------------

    async def _listen(self) -> None:
        """Receive this instance's replies and the wake-ups; resubscribe after an outage."""
        channels = (self.keys.reply(self.instance), self.keys.wake)
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                self.replies = Link.UP
                self._resumed()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"] == self.keys.wake:
                        self._wake.set()
                    else:
                        self._on_reply(message["data"])
            except Exception as err:  # Redis went away, or a bug of ours: answer what waits, listen again
                if not isinstance(err, (RedisError, OSError)):
                    log.exception("reply listener failed")
                self.replies = Link.LOST
                self._lost(err)
                await asyncio.sleep(0.2)
            finally:
                self.replies = Link.LOST
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _beat(self) -> None:
        """Keep this instance alive in Redis, learn the pool's GPUs, reclaim dead instances' batches."""
        while True:
            try:
                beat = HeartbeatReply.parse(
                    await self._heartbeat(
                        keys=[self.keys.instances, self.keys.gpus, self.keys.inflight, *self.keys.queues],
                        args=[self.instance, self.gpus, INSTANCE_TTL_MS],
                    )
                )
            except (RedisError, OSError) as err:
                self.heartbeat = Link.LOST
                self._lost(err)
                await asyncio.sleep(0.2)
                continue
            if beat.requeued or beat.dropped:
                self.metrics.shared_reclaimed.labels("requeued").inc(beat.requeued)
                self.metrics.shared_reclaimed.labels("dropped").inc(beat.dropped)
                log.warning(
                    "reclaimed the batches of a stopped instance: %d requeued, %d dropped", beat.requeued, beat.dropped
                )
            self.thresholds = self.model.backpressure.thresholds(beat.gpus, self.max_batch)  # the pool's, not ours
            self.heartbeat = Link.UP
            self._resumed()
            await asyncio.sleep(HEARTBEAT_S)

    def _lost(self, err: Exception) -> None:
        """Redis failed us: say so once, and answer every waiting request now rather than at its deadline."""
        if self.outage is None:
            log.error("Redis at %s unreachable (%s); answering 503 until it is back", self.url, err)
        self.outage = f"Redis unreachable ({type(err).__name__}: {err})"
        self._fail_pending("Redis became unreachable; the request's fate is unknown, retry it")

    def _resumed(self) -> None:
        if self.outage is not None and self.unavailable is None:
            log.info("Redis at %s reachable; serving", self.url)
            self.outage = None

    def _fail_pending(self, why: str) -> None:
        for request_id in list(self.pending):
            self._resolve(request_id, _unavailable(why))


def _unavailable(why: str) -> ApiError:
    return ApiError(503, why, code="queue_unavailable", retry_after_s=1)
