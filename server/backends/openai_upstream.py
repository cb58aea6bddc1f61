"""An upstream OpenAI-compatible server (``vllm serve``, SGLang, Ollama, LiteLLM) as the engine.

Each batch is one ``POST /v1/completions`` whose ``prompt`` is the list of inputs; the
choices come back with an ``index``, which maps each output to its request. Any
failure (connection refused, timeout, non-200, a malformed answer, a wrong count) fails
the whole batch with :class:`BackendError`, which the worker answers as 503 for every
request in it. One pooled session is kept for the server's life.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from pydantic import Field

from ...core.model import ServiceModel
from .base import Backend, BackendError, Generation, non_empty, scatter
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

    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        positions, prompts = non_empty(inputs)
        if not prompts:
            return [""] * len(inputs)
        body: dict[str, Any] = {
            "prompt": prompts,
            "max_tokens": self.generation.max_tokens,
            "temperature": self.generation.temperature,
        }
        if self.served_model:
            body["model"] = self.served_model
        return scatter(len(inputs), positions, await self._complete(body, len(prompts)))

    async def _complete(self, body: dict[str, Any], n: int) -> list[str]:
        data = await post_json(self._session, self.endpoint, body)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            texts = [str(c["text"]) for c in choices]
        except (KeyError, TypeError) as err:
            raise BackendError(f"upstream {self.endpoint} sent no choices/index/text: {err!r}") from err
        if [c["index"] for c in choices] != list(range(n)):
            raise BackendError(f"upstream {self.endpoint} sent {len(texts)} choices for {n} prompts")
        return texts
