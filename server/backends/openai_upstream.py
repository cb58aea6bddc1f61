"""An upstream OpenAI-compatible server (``vllm serve``, SGLang, Ollama, LiteLLM) as the engine.

A batch's non-streamed requests go as one ``POST /v1/completions`` per set of generation
parameters, whose ``prompt`` is the list of their inputs; the choices come back with an
``index``, which maps each output to its request. A streamed request gets a streaming
call of its own, so its client sees the upstream's tokens as they come. Any
failure (connection refused, timeout, non-200, a malformed answer, a wrong count) fails
the whole batch with :class:`BackendError`, which the worker answers as 503 for every
request in it. One pooled session is kept for the server's life.

Several engine replicas (``--upstream URL1,URL2,...``, SPEC section 13): each GPU worker
sends to the replica it is assigned (at start worker *g* to replica *g mod n*), so each
worker stands for one engine and the pool's scheduling spreads the load over them;
``serve`` starts one worker per replica unless told otherwise. Replicas also register and
leave while the server runs (``server/workers/replicas.py``). The model name and the
engine's limits are read from the first named.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any, ClassVar

import aiohttp
from pydantic import Field

from ...core.errors import UsageError
from ...core.model import ServiceModel
from ...core.sse import StreamReader
from .base import BackendError, EngineFlags, Generate, Generated, Generation, non_empty, scatter
from .http_client import ForwardingBackend, ForwardingOptions, post_json

__all__ = ["OpenAIBackend"]


class OpenAIOptions(ForwardingOptions):
    served_model: str | None = Field(default=None, description="model name to ask for; None: the upstream's first")
    generation: Generation = Field(default_factory=Generation)
    api_key: str | None = Field(default=None, description="sent as 'Authorization: Bearer KEY' (a keyed upstream)")
    workers: int = Field(default=1, ge=1, description="the server's GPU workers: worker g sends to replica g mod n")


class OpenAIBackend(ForwardingBackend):
    name: ClassVar[str] = "openai"
    has_replicas: ClassVar[bool] = True
    Options = OpenAIOptions
    options: OpenAIOptions

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        if not flags.upstream:
            raise UsageError("--backend openai needs --upstream URL (an OpenAI-compatible server)")
        return {"upstream": flags.upstream, "served_model": flags.model, "generation": flags.generation,
                "api_key": flags.api_key, "workers": flags.gpus}  # fmt: skip

    def __init__(self, model: ServiceModel, options: OpenAIOptions) -> None:
        super().__init__(model, options)
        self.replicas = upstream_replicas(options.upstream)
        self.base = self.replicas[0]
        self.assigned: dict[int, str] = {}  # GPU worker -> its replica's base URL (server/workers/replicas.py)
        self.endpoint = self.endpoint_for(0)
        self.served_model = options.served_model
        self.generation = options.generation

    def endpoint_for(self, gpu: int) -> str:
        """Where GPU worker ``gpu`` sends: its own replica."""
        base = self.assigned.get(gpu) or self.replicas[gpu % len(self.replicas)]
        return f"{base}/v1/completions"

    def assign(self, gpu: int, url: str) -> None:
        self.assigned[gpu] = url

    def release(self, gpu: int) -> None:
        self.assigned.pop(gpu, None)

    async def probe(self, url: str) -> str | None:
        """Whether ``url`` answers as an OpenAI-compatible engine: ``GET /v1/models`` with 200 within 5 s."""
        assert self._session is not None
        try:
            async with self._session.get(
                f"{url}/v1/models", headers=self.headers(), timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                return None if resp.status == 200 else f"GET /v1/models answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            return f"GET /v1/models failed: {type(err).__name__}"

    @property
    def served_name(self) -> str:
        return self.served_model or "openai"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}

    async def start(self) -> None:
        await super().start()
        if self.served_model is None:
            self.served_model = await self._first_model()

    async def _first_model(self) -> str | None:
        """The upstream's only model, when the user did not name one (vLLM serves one per process)."""
        assert self._session is not None
        try:
            async with self._session.get(f"{self.base}/v1/models") as resp:
                data = await resp.json(content_type=None)
            return str(data["data"][0]["id"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError):
            return None  # ask per batch without a model name; the upstream decides

    async def engine_limits(self) -> dict[str, tuple[int, str]]:
        """What a vLLM upstream tells: ``max_model_len`` in ``/v1/models``, the KV cache in ``/metrics``.

        vLLM exports its cache config as the labels of one gauge, ``vllm:cache_config_info``
        (``num_gpu_blocks`` x ``block_size`` tokens). Neither endpoint names the
        scheduler's ``max_num_seqs`` or ``max_num_batched_tokens``. Other servers say
        less, and an endpoint that fails simply says nothing.
        """
        assert self._session is not None
        limits: dict[str, tuple[int, str]] = {}
        try:
            async with self._session.get(f"{self.base}/v1/models") as resp:
                model = (await resp.json(content_type=None))["data"][0]
            if isinstance(model.get("max_model_len"), int):
                limits["max_model_len"] = (model["max_model_len"], "/v1/models")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            pass
        try:
            async with self._session.get(f"{self.base}/metrics") as resp:
                text = await resp.text() if resp.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, ValueError):
            text = ""
        labels = _gauge_labels(text, "vllm:cache_config_info")
        if labels.get("num_gpu_blocks", "").isdigit() and labels.get("block_size", "").isdigit():
            tokens = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
            limits["kv_cache_tokens"] = (tokens, "/metrics vllm:cache_config_info (num_gpu_blocks x block_size)")
        return limits

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        """One ``/v1/completions`` call per set of generation parameters for the non-streamed requests (the
        API takes one ``max_tokens`` a call), and one streaming call for each streamed request."""
        positions, live = non_empty(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        streamed: list[int] = []
        for i, request in enumerate(live):
            if request.sink is not None:
                streamed.append(i)
            else:
                groups[self._params(request)].append(i)
        endpoint = self.endpoint_for(gpu)
        calls = [self._complete([live[i] for i in idx], dict(key), endpoint) for key, idx in groups.items()]
        calls += [self._stream(live[i], endpoint) for i in streamed]
        answers = await asyncio.gather(*calls)
        outputs: list[Generated] = [Generated("")] * len(live)
        for idx, answer in zip([*groups.values(), *([i] for i in streamed)], answers, strict=True):
            for i, output in zip(idx, answer, strict=True):
                outputs[i] = output
        return scatter(len(requests), positions, outputs)

    def _params(self, request: Generate) -> tuple:
        """The request's generation parameters as the API names them; vLLM's and SGLang's extensions only when set."""
        temperature = self.generation.temperature if request.temperature is None else request.temperature
        params: dict[str, Any] = {
            "max_tokens": request.max_tokens or self.generation.max_tokens,
            "temperature": temperature,
        }
        if request.ignore_eos:
            params["ignore_eos"] = True  # exactly max_tokens tokens
        if request.stop:
            params["stop"] = list(request.stop)
        if request.seed is not None:
            params["seed"] = request.seed
        if request.min_tokens:
            params["min_tokens"] = request.min_tokens
        if self.served_model:
            params["model"] = self.served_model
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())

    async def _complete(self, requests: list[Generate], params: dict[str, Any], endpoint: str) -> list[Generated]:
        body = {**params, "prompt": [r.prompt for r in requests]}
        if "stop" in body:
            body["stop"] = list(body["stop"])
        data = await post_json(self._session, endpoint, body)
        n = len(requests)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            texts = [str(c["text"]) for c in choices]
            reasons = [str(c.get("finish_reason") or "length") for c in choices]
            usage = data.get("usage") or {}
        except (KeyError, TypeError, AttributeError) as err:
            raise BackendError(f"upstream {endpoint} sent no choices/index/text: {err!r}") from err
        if [c["index"] for c in choices] != list(range(n)):
            raise BackendError(f"upstream {endpoint} sent {len(texts)} choices for {n} prompts")
        # The API counts tokens for the whole call: a request's share is exact when its length is
        # (token-id prompts, ignore_eos), and split in proportion to text length otherwise.
        prompt_share = _shares([r.prompt for r in requests], int(usage.get("prompt_tokens") or 0))
        output_share = _shares(texts, int(usage.get("completion_tokens") or 0))
        exact = params["max_tokens"] if params.get("ignore_eos") else None
        return [
            Generated(text, prompt, exact or completion, reason)
            for text, prompt, completion, reason in zip(texts, prompt_share, output_share, reasons, strict=True)
        ]

    async def _stream(self, request: Generate, endpoint: str) -> list[Generated]:
        """One streamed request: its tokens go to its client as the upstream sends them; ``usage`` passed through.

        A client that leaves ends the upstream call (the upstream aborts the sequence, as vLLM does).
        """
        sink = request.sink
        assert sink is not None and self._session is not None
        body = {**dict(self._params(request)), "prompt": request.prompt, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if "stop" in body:
            body["stop"] = list(body["stop"])
        reader = StreamReader()
        try:
            async with self._session.post(endpoint, json=body) as resp:
                if resp.status != 200:
                    raise BackendError(f"{endpoint} answered {resp.status}: {(await resp.text())[:200]}")
                async for line in resp.content:
                    for piece in reader.feed(line, time.perf_counter()):
                        sink.token(piece)
                    if reader.finished or sink.cancelled:
                        break
        except (aiohttp.ClientError, TimeoutError) as err:
            raise BackendError(f"{endpoint} unreachable: {str(err) or type(err).__name__}") from err
        reading = reader.reading if sink.cancelled else reader.end()
        if reading.problem is not None:
            raise BackendError(f"{endpoint} sent a stream we cannot serve: {reading.problem}")
        prompt = reading.prompt_tokens if reading.prompt_tokens is not None else _shares([request.prompt], 0)[0]
        output = Generated(
            "".join(reading.text), prompt, reading.output_tokens, reading.finish_reason or "length",
            reading.cached_tokens,  # the engine's prefix cache, passed on in our usage
        )  # fmt: skip
        if not sink.cancelled:
            sink.finish(output)
        return [output]


def upstream_replicas(upstream: str) -> list[str]:
    """``--upstream URL1,URL2,...`` as base URLs; a bad one is one line naming it."""
    replicas = [u.strip().rstrip("/") for u in upstream.split(",") if u.strip()]
    bad = [u for u in replicas if not u.startswith(("http://", "https://"))]
    if not replicas or bad:
        raise UsageError(f"--upstream takes http(s) base URLs, comma-separated; not a URL: {(bad or [upstream])[0]!r}")
    return replicas


def _gauge_labels(metrics_text: str, name: str) -> dict[str, str]:
    """The labels of the first sample of gauge ``name`` in a Prometheus text page ({} if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == name:
                    return dict(sample.labels)
    except ValueError:  # not a metrics page
        return {}
    return {}


def _shares(items: list[str] | list[str | list[int]], total: int) -> list[int]:
    """Each item's token count: a token-id list's length, or its share of ``total`` by characters."""
    texts = [i for i in items if not isinstance(i, list)]
    known = sum(len(i) for i in items if isinstance(i, list))
    chars = sum(len(t) for t in texts) or 1
    rest = max(total - known, 0)
    return [len(i) if isinstance(i, list) else round(rest * len(i) / chars) for i in items]
