"""The OpenAI-compatible routes: completions and chat (streamed or not), models, health.

They share everything with ``/v1/inference`` (:class:`~.gateway.PublicApi`): the key and
its tier, the drain, the size bound, the key's limits, the zones (429 before any byte),
the tier queue and the GPU workers. Only the shapes differ (:mod:`.openai_api`).

A streamed request hands the engine a :class:`StreamSink`. The response starts with the
first token, so everything that can go wrong before it (429, 503, 504) is still a
plain JSON error with its status; after it, an error is one SSE ``error`` event and
``[DONE]``. A backend that cannot stream (or a request run by another instance of a
shared Redis queue) answers whole, and the stream sends that answer as one chunk. A
client that hangs up mid-stream is one log line and a counter: its sink is marked
cancelled, so the engine can stop or drop its tokens, and the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ...core.tiers import Tier
from ..access.keys import KeyGrant
from ..api_errors import ApiError
from ..backends.base import Generated
from .gateway import PublicApi, _json_body
from .openai_api import DONE, LlmRequest, Shapes, parse_chat, parse_completion

__all__ = ["StreamSink", "openai_routes"]

log = logging.getLogger("infer_plan.server")

# SSE comments keep idle streams open through proxies; a token stream is never idle this long,
# and `vllm bench serve` reads every event as JSON, so a comment mid-stream would break it.
PING_INTERVAL_S = 3600.0


class StreamSink:
    """One streamed request's tokens on their way from the engine to the handler (see ``TokenSink``)."""

    __slots__ = ("_wake", "cancelled", "output", "pieces")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.output: Generated | None = None  # set by finish(): the stream may close
        self.cancelled = False
        self._wake = asyncio.Event()

    def token(self, piece: str) -> None:
        self.pieces.append(piece)
        self._wake.set()

    def finish(self, output: Generated) -> None:
        self.output = output
        self._wake.set()

    def batch_done(self, future: asyncio.Future[Generated]) -> None:
        """The batch ended (the handler may already be gone: the exception is read here, never left unread)."""
        if not future.cancelled():
            future.exception()
        self._wake.set()

    async def wait(self) -> list[str]:
        """The tokens that came since the last call, once there are some or the request is done."""
        await self._wake.wait()
        self._wake.clear()
        pieces, self.pieces = self.pieces, []
        return pieces


class OpenAIApi:
    def __init__(self, public: PublicApi) -> None:
        self.public = public
        self.state = public.state
        self.metrics = public.metrics
        self.created = int(time.time())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        grant = self.public.authorize(request)
        llm = parse_completion(await _json_body(request))
        self.public.check_model(llm.model, "model_not_found")
        return await self._serve(request, grant, llm)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        grant = self.public.authorize(request)
        llm, messages = parse_chat(await _json_body(request))
        self.public.check_model(llm.model, "model_not_found")
        llm.generate.prompt = self.state.backend.render_chat(messages)
        return await self._serve(request, grant, llm)

    async def _serve(self, request: web.Request, grant: KeyGrant, llm: LlmRequest) -> web.StreamResponse:
        arrived = asyncio.get_running_loop().time()
        for generate in (llm.generate, *llm.more):
            self.public.check_size(generate.prompt, "messages" if llm.chat else "prompt")
        shapes = Shapes(self.public.request_id(), llm.model, llm.chat)
        tier = grant.tier
        slot = await self.public.limiter.admit(grant)
        try:  # the key's in-flight slot is held until the answer, or the stream, has ended
            if llm.stream:
                return await self._stream(request, llm, shapes, tier, arrived)
            outputs = await asyncio.gather(*(self.public.generate(g, tier) for g in (llm.generate, *llm.more)))
        finally:
            self.public.limiter.release(slot)
        for output in outputs:
            self._count(tier, output, arrived)
        request["tier"] = tier.label
        return web.json_response(shapes.answer(*outputs))

    def _count(self, tier: Tier, output: Generated, arrived: float) -> None:
        metrics = self.metrics
        metrics.ok[tier].inc()
        metrics.tier_latency[tier].observe(asyncio.get_running_loop().time() - arrived)
        metrics.tier_prompt_tokens[tier].inc(output.prompt_tokens)
        metrics.tier_generation_tokens[tier].inc(output.completion_tokens)

    async def _stream(
        self, request: web.Request, llm: LlmRequest, shapes: Shapes, tier: Tier, arrived: float
    ) -> web.StreamResponse:
        sink = StreamSink()
        llm.generate.sink = sink
        future = await self.public.offer(llm.generate, tier)
        future.add_done_callback(sink.batch_done)
        loop = asyncio.get_running_loop()
        response: EventSourceResponse | None = None
        last_at = 0.0
        request["tier"] = tier.label
        try:
            async with asyncio.timeout_at(arrived + self.public.timeout_s):
                while True:
                    pieces = await sink.wait()
                    output = sink.output
                    if output is None and future.done():
                        output = future.result()  # raises the batch's ApiError; not streamed: the answer whole
                        if response is None and not pieces:
                            pieces = [output.text]
                    if not pieces:
                        if output is None:
                            continue
                        pieces = [""]  # the end came after the last token: an empty chunk carries the finish reason
                    now = loop.time()
                    first = response is None
                    if response is None:
                        response = EventSourceResponse(allow_all_methods=True, ping_interval=PING_INTERVAL_S)
                        await response.prepare(request)
                        self.metrics.tier_ttft[tier].observe(now - arrived)
                    else:
                        self.metrics.itl.observe(now - last_at)
                    last_at = now
                    reason = output.finish_reason if output is not None else None
                    data = shapes.chunks(pieces, first, reason)
                    if output is not None:
                        if llm.include_usage:
                            data += shapes.usage_chunk(output)
                        await response.write(data + DONE)
                        self._count(tier, output, arrived)
                        return response
                    await response.write(data)
        except TimeoutError:
            err = ApiError(504, f"no answer within {self.public.timeout_s:g} s")
        except ApiError as failed:
            err = failed
        except ConnectionResetError:
            sink.cancelled = True
            future.cancel()  # still queued: it leaves the queue without taking a batch slot
            self.metrics.client_disconnects.labels("stream").inc()
            log.info("client disconnected mid-stream: %s", request.path)
            return response or web.Response(status=499)
        self.metrics.responses.labels(tier.label, str(err.status)).inc()
        sink.cancelled = True
        future.cancel()
        if response is None:
            raise err
        with contextlib.suppress(ConnectionResetError):
            await response.write(shapes.error_chunk(err) + DONE)
        return response

    async def models(self, request: web.Request) -> web.Response:
        self.public.authorize(request)
        name = self.state.model_name
        entry = {"id": name, "object": "model", "created": self.created, "owned_by": "infer-plan", "root": name}
        return web.json_response({"object": "list", "data": [entry]})

    async def health(self, request: web.Request) -> web.Response:
        """200 while serving (as vLLM's ``/health``); 503 while starting or draining."""
        if self.state.draining or not self.state.ready:
            raise ApiError(503, "draining" if self.state.draining else "starting up", code="not_ready")
        return web.Response(status=200)


def openai_routes(public: PublicApi) -> list[web.RouteDef]:
    api = OpenAIApi(public)
    return [
        web.post("/v1/completions", api.completions),
        web.post("/v1/chat/completions", api.chat),
        web.get("/v1/models", api.models),
        web.get("/health", api.health),
    ]
