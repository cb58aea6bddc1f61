"""An upstream OpenAI-compatible server (``vllm serve``, SGLang, Ollama, LiteLLM) as the engine.

Each batch is one ``POST /v1/completions`` whose ``prompt`` is the list of inputs; the
choices come back with an ``index``, which maps each output to its request. Any
failure (connection refused, timeout, non-200, a malformed answer, a wrong count) fails
the whole batch with :class:`BackendError`, which the worker answers as 503 for every
request in it. One pooled session is kept for the server's life.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import aiohttp
from pydantic import Field

from ...core.model import ServiceModel
from .base import Backend, BackendError, Generate, Generated, Generation, non_empty, scatter
from .http_client import ForwardingBackend, ForwardingOptions, post_json

__all__ = ["OpenAIBackend"]


class OpenAIOptions(ForwardingOptions):
    served_model: str | None = Field(default=None, description="model name to ask for; None: the upstream's first")
    generation: Generation = Field(default_factory=Generation)


@Backend.register("openai")
class OpenAIBackend(ForwardingBackend):
    Options = OpenAIOptions
    options: OpenAIOptions

    def __init__(self, model: ServiceModel, options: OpenAIOptions) -> None:
        super().__init__(model, options)
        self.endpoint = f"{self.base}/v1/completions"
        self.served_model = options.served_model
        self.generation = options.generation

    @property
    def served_name(self) -> str:
        return self.served_model or "openai"

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

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        """One ``/v1/completions`` call per length in the batch (the API takes one ``max_tokens`` a call)."""
        positions, live = non_empty(requests)
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, request in enumerate(live):
            groups[(request.max_tokens or self.generation.max_tokens, request.ignore_eos)].append(i)
        answers = await asyncio.gather(*(self._complete([live[i] for i in idx], *key) for key, idx in groups.items()))
        outputs: list[Generated] = [Generated("")] * len(live)
        for idx, answer in zip(groups.values(), answers, strict=True):
            for i, output in zip(idx, answer, strict=True):
                outputs[i] = output
        return scatter(len(requests), positions, outputs)

    async def _complete(self, requests: list[Generate], max_tokens: int, ignore_eos: bool) -> list[Generated]:
        body: dict[str, Any] = {
            "prompt": [r.prompt for r in requests],
            "max_tokens": max_tokens,
            "temperature": self.generation.temperature,
        }
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's and SGLang's extension: exactly max_tokens tokens
        if self.served_model:
            body["model"] = self.served_model
        data = await post_json(self._session, self.endpoint, body)
        n = len(requests)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            texts = [str(c["text"]) for c in choices]
            reasons = [str(c.get("finish_reason") or "length") for c in choices]
            usage = data.get("usage") or {}
        except (KeyError, TypeError, AttributeError) as err:
            raise BackendError(f"upstream {self.endpoint} sent no choices/index/text: {err!r}") from err
        if [c["index"] for c in choices] != list(range(n)):
            raise BackendError(f"upstream {self.endpoint} sent {len(texts)} choices for {n} prompts")
        # The API counts tokens for the whole call: a request's share is exact when its length is
        # (token-id prompts, ignore_eos), and split in proportion to text length otherwise.
        prompt_share = _shares([r.prompt for r in requests], int(usage.get("prompt_tokens") or 0))
        output_share = _shares(texts, int(usage.get("completion_tokens") or 0))
        return [
            Generated(text, prompt, max_tokens if ignore_eos else completion, reason)
            for text, prompt, completion, reason in zip(texts, prompt_share, output_share, reasons, strict=True)
        ]


def _shares(items: list[str] | list[str | list[int]], total: int) -> list[int]:
    """Each item's token count: a token-id list's length, or its share of ``total`` by characters."""
    texts = [i for i in items if not isinstance(i, list)]
    known = sum(len(i) for i in items if isinstance(i, list))
    chars = sum(len(t) for t in texts) or 1
    rest = max(total - known, 0)
    return [len(i) if isinstance(i, list) else round(rest * len(i) / chars) for i in items]
