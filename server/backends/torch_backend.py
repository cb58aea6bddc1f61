"""Your own torch model behind the server: the design's cycle (PCIe in, kernel, PCIe out), run and timed.

``serve --backend torch [--torch-model MODULE:FACTORY] [--device cpu|cuda|cuda:N]``. One
replica of the model per GPU worker (``--gpus N``: devices ``cuda:0 .. cuda:N-1``, or N
replicas on the CPU). Per batch: each input through the factory's ``preprocess``, padded
and stacked into one (pinned, on a GPU) host tensor, copied to the device without
blocking, the forward pass under ``torch.inference_mode()``, the result copied back and
mapped to its requests by position. The three phases are timed (CUDA events on a GPU,
``perf_counter`` on the CPU) and kept per GPU for the pool to export (Prometheus and the
batch log), so ``calibrate --backend torch`` can split the cycle the way the service
model does.

The forward pass runs in a worker thread: torch releases the GIL in its kernels, so the
gateway keeps answering (health checks, 429s) while a batch runs. Every replica runs a
few warm-up batches in :meth:`start` (first kernels, the allocator); the server accepts
nothing until they are done. Out of memory on a batch answers that batch 503 and the
worker goes on with the next.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import time
from typing import Any, ClassVar

from pydantic import Field, field_validator

from ...core.errors import ConfigError
from ...core.model import ServiceModel
from .base import Backend, BackendError, BackendOptions, EngineFlags, Generate, Generated

__all__ = ["PHASES", "TorchBackend"]

log = logging.getLogger("infer_plan.server")

PHASES = ("pcie_in_ms", "kernel_ms", "pcie_out_ms")
_DTYPES = ("float32", "float16", "bfloat16")
_WARMUP_SIZES = (1, 8, 32)


class TorchOptions(BackendOptions):
    torch_model: str | None = Field(default=None, description="MODULE:FACTORY; None: the built-in byte encoder")
    device: str = "cpu"
    dtype: str = "float32"
    replicas: int = Field(default=1, ge=1, description="one per GPU worker")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"--device takes cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"--dtype takes {', '.join(_DTYPES)}, not {value!r}")
        return value


class _Replica:
    """One copy of the model on one device, with the phase times of its last batch."""

    def __init__(self, module: Any, preprocess: Any, device: Any, dtype: Any, torch: Any) -> None:
        self.torch = torch
        self.module = module.to(device=device, dtype=dtype).eval()
        self.preprocess = preprocess
        self.device = device
        self.cuda = device.type == "cuda"
        self.last_phases: dict[str, float] | None = None

    def run(self, texts: list[str]) -> list[list[float]]:
        torch = self.torch
        started = time.perf_counter()
        inputs = [self.preprocess(text) for text in texts]
        width = max(int(t.numel()) for t in inputs)
        host = torch.zeros((len(inputs), width), dtype=torch.long)  # padded positions are masked, any id will do
        mask = torch.ones((len(inputs), width), dtype=torch.bool)
        for i, ids in enumerate(inputs):
            host[i, : ids.numel()] = ids
            mask[i, : ids.numel()] = False
        if self.cuda:
            host, mask = host.pin_memory(), mask.pin_memory()
            return self._run_cuda(host, mask, started)
        packed = time.perf_counter()
        with torch.inference_mode():
            out = self.module(host, mask)
        computed = time.perf_counter()
        values = out.float().tolist()
        done = time.perf_counter()
        self.last_phases = {
            "pcie_in_ms": (packed - started) * 1000.0,
            "kernel_ms": (computed - packed) * 1000.0,
            "pcie_out_ms": (done - computed) * 1000.0,
        }
        return values

    def _run_cuda(self, host: Any, mask: Any, started: float) -> list[list[float]]:
        torch = self.torch
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        stream = torch.cuda.current_stream(self.device)
        events[0].record(stream)
        ids = host.to(self.device, non_blocking=True)
        padding = mask.to(self.device, non_blocking=True)
        events[1].record(stream)
        with torch.inference_mode():
            out = self.module(ids, padding)
        events[2].record(stream)
        back = out.float().to("cpu", non_blocking=True)
        events[3].record(stream)
        events[3].synchronize()
        packing_ms = (time.perf_counter() - started) * 1000.0 - events[0].elapsed_time(events[3])
        self.last_phases = {
            "pcie_in_ms": max(0.0, packing_ms) + events[0].elapsed_time(events[1]),
            "kernel_ms": events[1].elapsed_time(events[2]),
            "pcie_out_ms": events[2].elapsed_time(events[3]),
        }
        return back.tolist()


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"
    Options = TorchOptions

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        return {"torch_model": flags.torch_model, "device": flags.device, "dtype": flags.dtype or "float32",
                "replicas": flags.gpus}  # fmt: skip

    def __init__(self, model: ServiceModel, options: TorchOptions) -> None:
        super().__init__(model, options)
        self.options: TorchOptions = options
        self.replicas: list[_Replica] = []

    @property
    def served_name(self) -> str:
        """The factory's name (``MODULE:FACTORY`` -> ``FACTORY``), or the built-in's; ``--served-model-name`` wins."""
        return self.options.torch_model.rpartition(":")[2] if self.options.torch_model else "byte-encoder"

    async def start(self) -> None:
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            raise ConfigError("--backend torch needs torch: pip install 'infer-plan[torch]'") from None
        factory = _factory(self.options.torch_model)
        devices = _devices(torch, self.options.device, self.options.replicas)
        dtype = getattr(torch, self.options.dtype)
        for device in devices:
            module, preprocess = factory()
            self.replicas.append(_Replica(module, preprocess, device, dtype, torch))
        sizes = sorted({min(size, self.model.max_batch) for size in _WARMUP_SIZES})
        for replica in self.replicas:  # first kernels and the allocator, before any client waits on them
            for size in sizes:
                try:
                    await asyncio.to_thread(replica.run, [f"warm-up input {i}" for i in range(size)])
                except Exception as err:
                    if not _is_oom(err):
                        raise
                    log.warning("torch warm-up: out of memory at a batch of %d; such batches get 503", size)
                    break

    def batch_phases(self, gpu: int) -> dict[str, float] | None:
        return self.replicas[gpu % len(self.replicas)].last_phases if self.replicas else None

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        replica = self.replicas[gpu % len(self.replicas)]
        texts = [r.prompt if isinstance(r.prompt, str) else " ".join(map(str, r.prompt)) for r in requests]
        try:
            vectors = await asyncio.to_thread(replica.run, texts)
        except Exception as err:  # out of memory and any other failure of the batch: 503 for it, the worker goes on
            if replica.cuda:
                replica.torch.cuda.empty_cache()
            kind = "out of memory" if _is_oom(err) else type(err).__name__
            raise BackendError(f"torch {kind} on a batch of {len(requests)}: {str(err).splitlines()[0][:200]}") from err
        pairs = zip(vectors, texts, strict=True)
        return [Generated(_format(vector), prompt_tokens=len(text), completion_tokens=1) for vector, text in pairs]


def _format(vector: list[float]) -> str:
    """The output vector as text: what ``/v1/inference`` answers (6 significant digits each)."""
    return ",".join(f"{v:.6g}" for v in vector)


def _is_oom(err: Exception) -> bool:
    text = str(err).lower()
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def _factory(spec: str | None) -> Any:
    if spec is None:
        from .torch_encoder import default_model

        return default_model
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--torch-model {spec!r}: give MODULE:FACTORY")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--torch-model {spec!r}: {err}") from None


def _devices(torch: Any, device: str, replicas: int) -> list[Any]:
    """``cpu``: every replica on the CPU; ``cuda``: one device each; ``cuda:N``: all on device N."""
    if device == "cpu":
        return [torch.device("cpu")] * replicas
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device here (use --device cpu)")
    count = torch.cuda.device_count()
    if device == "cuda":
        if replicas > count:
            raise ConfigError(f"--gpus {replicas} with --device cuda needs {replicas} devices; torch sees {count}")
        return [torch.device(f"cuda:{i}") for i in range(replicas)]
    index = int(device.split(":")[1])
    if index >= count:
        raise ConfigError(f"--device {device}: torch sees {count} CUDA device(s)")
    return [torch.device(device)] * replicas
