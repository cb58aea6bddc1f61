"""App factories: the public and the internal aiohttp applications of one server.

The tier queue and one GPU worker per GPU run as tasks of a ``cleanup_ctx`` generator, which
creates them, yields while the app serves, then cancels and awaits them, so nothing is
left orphaned when the app stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from ...core.model import Batching, Routing
from ..access.key_limiter import LocalKeyLimiter, SharedKeyLimiter
from ..access.keys import KeyStore
from ..api_errors import ErrorMiddleware
from ..backends.base import Backend
from ..config import ServerConfig
from ..queues.memory_queue import MemoryQueue
from ..queues.queue import TierQueue
from ..queues.routed_queue import RoutedQueue
from ..queues.shared_queue import SharedQueue
from ..queues.shared_scaling import SharedScaleLedger
from ..workers.autoscaler import (
    ActorActuator,
    Actuator,
    HookActuator,
    LocalLedger,
    ServerAutoscaler,
    WorkerActuator,
)
from ..workers.gpu_pool import GpuPool
from ..workers.replicas import ReplicaSet
from .access_log import AccessLog
from .gateway import internal_routes, public_routes
from .state import ServerState

__all__ = ["STATE", "build_apps", "make_state"]

STATE = web.AppKey("state", ServerState)


def make_state(config: ServerConfig) -> ServerState:
    keys = KeyStore.load(config.keys_file)
    backend = Backend.create(config.backend, config.model, config.backend_options)
    access_log = AccessLog() if config.access_log else None
    return ServerState(config=config, keys=keys, backend=backend, access_log=access_log)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    await state.backend.start()
    queue: TierQueue
    if config.redis_url is None:
        routed = config.model.routing is not Routing.SHARED_QUEUE
        queue = (RoutedQueue if routed else MemoryQueue)(config.model, config.gpus)
        state.limiter = LocalKeyLimiter(state.metrics, clock=asyncio.get_running_loop().time)
    else:
        queue = SharedQueue(config.model, config.gpus, state.metrics, url=config.redis_url, prefix=config.redis_prefix)
        state.limiter = SharedKeyLimiter(
            state.metrics, queue.client, queue.keys, queue.instance, ttl_s=config.model.request_timeout_s
        )
    continuous = config.model.batching is Batching.CONTINUOUS
    pool = GpuPool(
        queue,
        state.backend,
        state.metrics,
        timeout_s=config.model.request_timeout_s,
        continuous_seqs=config.model.max_num_seqs if continuous else None,
    )
    state.queue, state.pool = queue, pool
    await queue.start()
    if state.backend.has_replicas:
        state.replicas = ReplicaSet(pool, state.backend, state.metrics, check_s=config.replica_check_s)  # type: ignore[arg-type]
        state.replicas.start(config.gpus)
    else:
        for _ in range(config.gpus):
            pool.start_worker()
    scaling = None
    if config.model.autoscale.enabled:
        ledger = (
            SharedScaleLedger(queue, config.model.autoscale.tick_s) if isinstance(queue, SharedQueue) else LocalLedger()
        )  # several instances on one Redis: one decides each tick, on all their counts
        state.autoscaler = ServerAutoscaler(pool, config.model, state.metrics, _actuator(state, pool), ledger)
        scaling = asyncio.create_task(state.autoscaler.run(), name="autoscaler")
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        if scaling is not None and state.autoscaler is not None:
            scaling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scaling
            await state.autoscaler.close()
        if state.replicas is not None:
            await state.replicas.close()
        await pool.stop()
        await state.limiter.close()
        await queue.close()
        await state.backend.close()


def _actuator(state: ServerState, pool: GpuPool) -> Actuator:
    """How the autoscaler adds GPUs here: sim workers, or engine replicas the operator's command starts."""
    config = state.config
    if state.backend.name == "ray":
        return ActorActuator(pool, state.backend)  # type: ignore[arg-type]  (RayBackend adds and removes actors)
    if state.replicas is None:
        return WorkerActuator(pool, config.model.cold_start_s)
    assert config.provision_command is not None  # ServerConfig requires it with autoscaling on this backend
    return HookActuator(
        state.replicas, config.provision_command, config.release_command,
        f"{state.internal_url}/internal/replicas", config.provision_timeout_s,
    )  # fmt: skip


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    access_log = app[STATE].access_log
    task = asyncio.create_task(access_log.run(), name="access-log") if access_log is not None else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _client_max_size(config: ServerConfig, inputs: int = 1) -> int:
    # Room for JSON escaping of the largest allowed input (up to 6 bytes per char for \uXXXX) plus fields.
    return inputs * (config.model.max_input_bytes * 6 + 64) + 4096


def build_apps(state: ServerState) -> tuple[web.Application, web.Application]:
    """(public app, internal app); the public one owns the engine's lifecycle."""
    errors = ErrorMiddleware(state.metrics.client_disconnects.labels("request"))
    public = web.Application(middlewares=[errors], client_max_size=_client_max_size(state.config))
    public[STATE] = state
    public.add_routes(public_routes(state))
    public.cleanup_ctx.append(_engine_ctx)
    public.cleanup_ctx.append(_access_log_ctx)
    internal = web.Application(
        middlewares=[errors], client_max_size=_client_max_size(state.config, state.config.model.max_batch)
    )
    internal[STATE] = state
    internal.add_routes(internal_routes(state))
    return public, internal
