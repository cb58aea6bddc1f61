"""HTTP handlers: the public inference API, health, metrics, and the internal API (batches in, batch log out).

The public request path: authenticate the key (tier), parse and validate the body,
check the model and the size, apply backpressure (429 at once, before queueing), then
queue and await the future the GPU worker resolves. Every accepted request gets
exactly one answer: its output, or an error when its batch failed or its deadline
passed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...core.tiers import Tier
from ..access.key_limiter import KeyLimiter
from ..access.keys import KeyGrant, KeyStore
from ..api_errors import ApiError
from ..backends.base import Generate, Generated
from ..metrics import ServerMetrics
from ..queues.queue import TierQueue
from ..workers.gpu_pool import GpuPool
from ..workers.replicas import ReplicaSet
from .state import ServerState

__all__ = ["internal_routes", "public_routes"]

_BEARER = "Bearer "
_Part = TypeVar("_Part")
_OPENAPI = Path(__file__).with_name("openapi.yaml")  # the public API's description, kept in the repository


def _grant_of(request: web.Request, keys: KeyStore) -> KeyGrant:
    header = request.headers.get("Authorization", "")
    if not header.startswith(_BEARER):
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'")
    grant = keys.grant_of(header[len(_BEARER) :].strip())
    if grant is None:
        raise ApiError(401, "unknown API key")
    return grant


def _started(part: _Part | None) -> _Part:
    """A part the app makes when it starts; until then requests get 503."""
    if part is None:
        raise ApiError(503, "starting up", code="not_ready", retry_after_s=1)
    return part


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()  # bounded by the app's client_max_size (413 past it)
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "body is not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"body is not valid JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise ApiError(400, "JSON nested too deeply") from None


class PublicApi:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.keys = state.keys
        self.metrics: ServerMetrics = state.metrics
        self.max_input_bytes = state.config.model.max_input_bytes
        self.timeout_s = state.config.model.request_timeout_s
        self.retry_after = state.config.model.backpressure.retry_after_s
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"

    @property
    def queue(self) -> TierQueue:
        """Created when the app starts (inside the running loop), after the routes."""
        return _started(self.state.queue)

    @property
    def limiter(self) -> KeyLimiter:
        return _started(self.state.limiter)

    def request_id(self) -> str:
        """Unique within the process and, by the pid, among the instances sharing a port."""
        return f"{self._prefix}-{next(self._ids)}"

    async def inference(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        grant = self.authorize(request)
        tier = grant.tier
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, 'body must be a JSON object: {"model": str, "input": str}')
        model, text = body.get("model"), body.get("input")
        if model is None or text is None:
            missing = [k for k in ("model", "input") if body.get(k) is None]
            raise ApiError(400, f"missing field(s): {', '.join(missing)}")
        if not isinstance(model, str) or not isinstance(text, str):
            raise ApiError(400, "fields 'model' and 'input' must be strings")
        self.check_model(model)
        self.check_size(text, "input")
        slot = await self.limiter.admit(grant)
        try:
            output = await self.generate(Generate(text), tier)
        finally:
            self.limiter.release(slot)
        latency = loop.time() - arrived
        self.metrics.ok[tier].inc()
        self.metrics.tier_latency[tier].observe(latency)
        request["tier"] = tier.label
        return web.json_response(
            {
                "request_id": self.request_id(),
                "output": output.text,
                "latency_ms": round(latency * 1000.0, 3),
            }
        )

    def authorize(self, request: web.Request) -> KeyGrant:
        """The key's grant (401 without one); 503 while draining, so clients go to another instance."""
        grant = _grant_of(request, self.keys)
        if self.state.draining:
            self.metrics.rejected.labels(grant.tier.label, "draining").inc()
            raise ApiError(
                503, "server is draining; retry on another instance", code="draining", retry_after_s=self.retry_after
            )
        return grant

    def check_model(self, model: str, code: str = "not_found") -> None:
        """404 for another model's name (the OpenAI routes answer with OpenAI's code, ``model_not_found``)."""
        if model != self.state.model_name:
            raise ApiError(
                404, f"unknown model {model!r}; this server serves {self.state.model_name!r}", code=code, param="model"
            )

    def check_size(self, prompt: str | list[int], param: str) -> None:
        """413 past ``max_input_bytes`` (a token id counts as one byte: the bound is on work, not encoding)."""
        size = len(prompt)
        if size > self.max_input_bytes or (
            isinstance(prompt, str) and len(prompt.encode("utf-8", "surrogatepass")) > self.max_input_bytes
        ):
            raise ApiError(413, f"{param} too large (limit {self.max_input_bytes} bytes)", param=param)

    async def offer(self, request: Generate, tier: Tier) -> asyncio.Future[Generated]:
        """Queue the request if its tier is admitted now, else the 429 that sheds it."""
        request.priority = int(tier)  # what an engine with priority scheduling orders by (enterprise first)
        if (scaler := self.state.autoscaler) is not None:
            scaler.note_arrival()  # offered load, shed or not: what the autoscaler's rule reads
        future = await self.queue.offer(request, tier)
        if future is not None and scaler is not None:
            future.add_done_callback(scaler.note_answer)
        if future is None:
            if self.queue.gpus == 0:  # every engine replica left or failed: not an overload, so not a 429
                raise ApiError(503, "no GPU is serving", code="no_gpus", retry_after_s=5)
            self.metrics.shed[tier].inc()
            raise ApiError(429, "overloaded: shedding this tier for now", retry_after_s=self.retry_after)
        return future

    async def generate(self, request: Generate, tier: Tier) -> Generated:
        """Queue the request if its tier is admitted now (429 if not) and wait for its output."""
        future = await self.offer(request, tier)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self.metrics.responses.labels(tier.label, "504").inc()
            raise ApiError(504, f"no answer within {self.timeout_s:g} s") from None
        except ApiError as err:
            self.metrics.responses.labels(tier.label, str(err.status)).inc()
            raise

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.state.draining or not self.state.ready:
            raise ApiError(503, "not ready" if not self.state.draining else "draining", code="not_ready")
        if (why := self.queue.unavailable) is not None:
            raise ApiError(503, why, code="queue_unavailable")
        engine = self.state.backend.readiness()
        if engine.get("actors_live", 1) == 0:
            raise ApiError(503, "no engine actor is live", code="engine_unavailable")
        if (scaler := self.state.autoscaler) is not None:
            engine.update(scaler.readiness())
        if (replicas := self.state.replicas) is not None:
            engine["replicas"] = replicas.listing()
            if not any(r["state"] == "serving" for r in engine["replicas"]):
                raise ApiError(503, "no engine replica is serving", code="engine_unavailable", retry_after_s=5)
        return web.json_response({"status": "ready", "gpus": self.queue.gpus, "queued": self.queue.queued, **engine})

    async def openapi(self, request: web.Request) -> web.Response:
        # The kept description names the default model; this server's copy names its own.
        text = _OPENAPI.read_text(encoding="utf-8").replace(
            "enum: [sim]", f"enum: [{json.dumps(self.state.model_name)}]"
        )
        return web.Response(text=text, content_type="application/yaml")

    async def metrics_text(self, request: web.Request) -> web.Response:
        for tier, depth in enumerate(await self.queue.depths()):
            self.metrics.tier_depth[tier].set(depth)
        self.metrics.count_engine_restarts(self.state.backend.restart_count())
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def public_routes(state: ServerState) -> list[web.RouteDef]:
    from .openai_gateway import openai_routes  # it builds on PublicApi

    api = PublicApi(state)
    return [
        *openai_routes(api),
        web.post("/v1/inference", api.inference),
        web.get("/healthz", api.healthz),
        web.get("/readyz", api.readyz),
        web.get("/metrics", api.metrics_text),
        web.get("/openapi.yaml", api.openapi),
    ]


class InternalApi:
    """The loopback API between a gateway and its GPU pool, and for tools that measure the pool.

    ``POST /internal/batch`` runs one batch on a free GPU, results by index position;
    ``GET /internal/batches?window_s=N`` lists the client-traffic batches served in the
    last N seconds (``calibrate --from-traffic``), with each batch's phase times where the
    backend measures them (torch), else null. ``/internal/replicas``: engine replicas
    that register (POST), leave (DELETE, drained first) and are listed (GET), for a
    backend with replicas (``server/workers/replicas.py``).
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def _pool(self) -> GpuPool:
        pool = self.state.pool
        if pool is None:
            raise ApiError(503, "starting up", code="not_ready", retry_after_s=1)
        return pool

    def _refuse_client_keys(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if header.startswith(_BEARER) and self.state.keys.tier_of(header[len(_BEARER) :].strip()) is not None:
            raise ApiError(403, "client keys cannot use the internal API")

    async def batch(self, request: web.Request) -> web.Response:
        self._refuse_client_keys(request)
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
            raise ApiError(400, 'body must be {"batch_id": ..., "requests": [{"input": str}, ...]}')
        batch_id = body.get("batch_id")
        requests = body["requests"]
        if not requests or len(requests) > self.state.config.model.max_batch:
            raise ApiError(400, f"a batch holds 1 to {self.state.config.model.max_batch} requests")
        outputs = await self._pool.run_now([_internal_request(i, item) for i, item in enumerate(requests)])
        return web.json_response(
            {
                "batch_id": batch_id,
                "status": "ok",
                "results": [{"index": i, **o.to_wire()} for i, o in enumerate(outputs)],
            }
        )

    async def batches(self, request: web.Request) -> web.Response:
        self._refuse_client_keys(request)
        try:
            window_s = float(request.query.get("window_s", "inf"))
        except ValueError:
            window_s = math.nan
        if not window_s > 0:
            raise ApiError(400, "'window_s' must be a number of seconds > 0")
        since = time.time() - window_s  # this server's clock, so the caller's does not matter
        served = self.state.pool.served if self.state.pool is not None else ()
        rows = [[round(b.ended_at, 3), b.size, round(b.ms, 3), b.phases] for b in served if b.ended_at >= since]
        return web.json_response({"columns": ["ended_at", "size", "ms", "phases"], "batches": rows})

    @property
    def _replicas(self) -> ReplicaSet:
        if self.state.replicas is None:
            raise ApiError(
                409,
                f"the {self.state.backend.name} backend has no engine replicas to register (--backend openai has)",
                code="no_replicas",
            )
        return self.state.replicas

    async def list_replicas(self, request: web.Request) -> web.Response:
        self._refuse_client_keys(request)
        return web.json_response({"replicas": self._replicas.listing()})

    async def add_replica(self, request: web.Request) -> web.Response:
        self._refuse_client_keys(request)
        replicas = self._replicas
        body = await _json_body(request)
        url = body.get("url") if isinstance(body, dict) else None
        workers = body.get("workers", 1) if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ApiError(400, 'body must be {"url": "http(s)://host:port", "workers": N (optional, default 1)}')
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ApiError(400, "'workers' must be an integer from 1 to 64")
        replica = await replicas.add(url.rstrip("/"), workers)
        return web.json_response(replica.to_wire(), status=201)

    async def scaling(self, request: web.Request) -> web.Response:
        """The autoscaler's decisions so far (``[service.autoscale] enabled``), oldest first."""
        self._refuse_client_keys(request)
        scaler = self.state.autoscaler
        if scaler is None:
            raise ApiError(
                409, "autoscaling is off: [service.autoscale] enabled = true turns it on", code="no_autoscaler"
            )
        return web.json_response(
            {"tick_s": scaler.policy.tick_s, "decisions": [d.to_wire() for d in scaler.decisions],
             "gpus_serving": self._pool.gpus, **scaler.readiness()}
        )  # fmt: skip

    async def remove_replica(self, request: web.Request) -> web.Response:
        self._refuse_client_keys(request)
        replicas = self._replicas
        url = request.query.get("url", "").rstrip("/")
        if not url:
            raise ApiError(400, "name the replica to remove: DELETE /internal/replicas?url=http(s)://host:port")
        replica = await replicas.remove(url)
        return web.json_response({"url": replica.url, "state": "removed"})


def _internal_request(i: int, item: object) -> Generate:
    """One request of an internal batch: ``input`` (text or token ids), optional ``max_tokens`` and ``ignore_eos``."""
    prompt = item.get("input") if isinstance(item, dict) else None
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids):
        raise ApiError(400, f"requests[{i}] must be an object with an 'input': a string or a list of token ids")
    assert isinstance(item, dict)
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, f"requests[{i}].max_tokens must be an integer >= 1")
    if not isinstance(item.get("ignore_eos", False), bool):
        raise ApiError(400, f"requests[{i}].ignore_eos must be true or false")
    return Generate.from_wire(item)


def internal_routes(state: ServerState) -> list[web.RouteDef]:
    api = InternalApi(state)
    return [
        web.post("/internal/batch", api.batch),
        web.get("/internal/batches", api.batches),
        web.get("/internal/replicas", api.list_replicas),
        web.post("/internal/replicas", api.add_replica),
        web.delete("/internal/replicas", api.remove_replica),
        web.get("/internal/scaling", api.scaling),
        web.get("/healthz", PublicApi(state).healthz),
    ]
