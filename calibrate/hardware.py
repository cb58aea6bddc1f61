"""NVIDIA's AIConfigurator data as a step-time oracle for hardware one does not own (SPEC section 12).

``aiconfigurator-core`` (the ``hardware`` extra, Apache-2.0) ships GEMM, attention and
communication timings measured per GPU and engine version, configs of popular models and
a memory model. This module is the only one that imports it: it checks a request
(model, GPU, tensor-parallel degree, engine) against what the package has, before any
work, and answers two questions: how long one engine step of a given shape takes on the
GPU, and how many KV tokens the engine's memory budget leaves.

It never touches the network: a model the package does not ship would make it try a
download from the Hugging Face hub, so such a name is refused here with the way out (a
local folder holding the model's ``config.json``).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UsageError

__all__ = ["INSTALL", "HardwareConfig", "StepOracle", "available", "check_names"]

INSTALL = "pip install 'infer-plan[hardware]'"
PACKAGE = "aiconfigurator-core"

# Each engine's share of total GPU memory it manages (weights, activations, KV): the frameworks' defaults as
# aiconfigurator-core itself mirrors them (vLLM gpu_memory_utilization 0.92 since 0.22; SGLang derives its
# mem_fraction_static from the GPU's capacity; TRT-LLM's free_gpu_memory_fraction 0.9 of what is free).
MEMORY_FRACTION = {"vllm": ("of_total", 0.92), "sglang": ("of_total", None), "trtllm": ("of_free", 0.9)}


@dataclass(frozen=True, slots=True)
class HardwareConfig:
    """One replica's hardware question: a model on ``tp`` GPUs of one kind under one engine."""

    model: str  # a name the package ships (e.g. meta-llama/Meta-Llama-3.1-8B) or a folder with config.json
    gpu: str  # the package's system name, e.g. h100_sxm
    tp: int
    engine: str  # vllm, sglang or trtllm


def _package() -> Any:
    """The package, quiet and offline; a missing extra is one line naming the install."""
    if importlib.util.find_spec("aiconfigurator_core") is None:
        raise UsageError(f"deriving a profile needs NVIDIA's {PACKAGE}: {INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: names are checked before any lookup
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)  # its MLA fallback notes do not concern us
    import aiconfigurator_core

    return aiconfigurator_core


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def available() -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """What the package has: {GPU: {engine: data versions}} and the models it ships."""
    _package()
    from aiconfigurator_core.sdk import common
    from aiconfigurator_core.sdk.perf_database import get_supported_databases

    systems = {
        gpu: {engine: sorted(versions) for engine, versions in sorted(engines.items())}
        for gpu, engines in sorted(get_supported_databases().items())
    }
    return systems, sorted(common.DefaultHFModels)


def check_names(model: str, gpus: Sequence[str], engine: str) -> None:
    """An engine, GPUs and a model the package has data for, or one line naming what it has (before any work)."""
    systems, models = available()
    engines = sorted({e for by_engine in systems.values() for e in by_engine})
    if engine not in engines:
        raise UsageError(f"--engine {engine}: not one {PACKAGE} has data for; choose {', '.join(engines)}")
    with_engine = [gpu for gpu, by_engine in systems.items() if engine in by_engine]
    unknown = [gpu for gpu in gpus if gpu not in with_engine]
    if unknown:
        raise UsageError(
            f"--gpu {','.join(unknown)}: {PACKAGE} has no {engine} data for it; "
            f"GPUs with data: {', '.join(with_engine)}"
        )
    folder = Path(model)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UsageError(f"--model {model}: a folder must hold the model's config.json")
    elif model not in models:
        raise UsageError(
            f"--model {model}: {PACKAGE} {package_version()} has no config for it and infer-plan does not download; "
            f"pass a folder holding its config.json, or one of the {len(models)} it ships (infer-plan profile --list)"
        )


def _model_config(model: str) -> dict[str, Any]:
    from aiconfigurator_core.sdk.utils import get_model_config_from_model_path

    try:
        return get_model_config_from_model_path(model)
    except Exception as err:  # the package's own errors vary by release: one line, the cause named
        raise UsageError(f"--model {model}: {PACKAGE} cannot read it ({err})") from None


class StepOracle:
    """The package's forward-pass estimate of one replica, asked one step at a time (10-30 µs a call)."""

    def __init__(self, config: HardwareConfig) -> None:
        self.config = config
        package = _package()
        check_names(config.model, [config.gpu], config.engine)
        from aiconfigurator_core.sdk.perf_database import get_latest_database_version

        self.data_version = get_latest_database_version(config.gpu, config.engine)  # what "current" reads
        parsed = _model_config(config.model)
        heads, kv_heads = int(parsed["n"]), int(parsed["n_kv"])
        self.layers = int(parsed["layers"])
        raw = parsed.get("raw_config", {})
        self.quantization = str(raw.get("quant_algo") or raw.get("torch_dtype") or "bf16")
        self.architecture = str(parsed.get("architecture", ""))
        if config.tp < 1 or heads % config.tp or (kv_heads % config.tp and config.tp % kv_heads):
            raise UsageError(
                f"--tp {config.tp}: {config.model} has {heads} attention heads and {kv_heads} KV heads; "
                "tensor parallelism must divide the heads (and divide or be a multiple of the KV heads)"
            )
        try:
            self._perf = package.sdk.RustForwardPassPerfModel.from_native(
                {"schema_version": 1, "model_name": config.model, "system_name": config.gpu,
                 "backend": config.engine, "backend_version": "current", "tp_size": config.tp, "pp_size": 1}
            )  # fmt: skip
        except Exception as err:
            raise UsageError(f"{config.model} on {config.gpu} x{config.tp} ({config.engine}): {err}") from None

    def step_ms(self, prefill: int, decoding: int, context: int, prefix: int = 0) -> float:
        """GPU time of one step: one request prefilling ``prefill`` tokens after ``prefix`` cached ones, beside
        ``decoding`` sequences each holding ``context`` tokens."""
        shape: dict[str, int] = {}
        if prefill:
            shape |= {"num_prefill_requests": 1, "sum_prefill_tokens": prefill, "sum_prefill_kv_tokens": prefix}
        if decoding:
            shape |= {"num_decode_requests": decoding, "sum_decode_kv_tokens": decoding * context}
        ms = self._perf.estimate_forward_pass_time_ms({"scheduled_requests": shape})
        if ms is None or not math.isfinite(ms):
            raise UsageError(f"{PACKAGE} has no estimate for a step of {shape} on {self.config.gpu}")
        return float(ms)

    def dispatch_overhead_ms(self) -> float:
        """The engine's per-request CPU dispatch time that kernel timings miss, as the package calibrates it
        (vLLM: 0.8 ms a layer; 0 where it has no figure)."""
        from aiconfigurator_core.sdk.backends.factory import get_backend

        backend = get_backend(self.config.engine)
        with contextlib.suppress(AttributeError, TypeError):
            return float(backend._prefill_dispatch_overhead_ms(_Layers(self.layers)))
        return 0.0

    def memory_fraction(self) -> tuple[str, float]:
        """The engine's default share of GPU memory, as (kind, value)."""
        kind, value = MEMORY_FRACTION[self.config.engine]
        if value is None:  # SGLang derives it from the GPU's capacity
            from aiconfigurator_core.sdk.backends.sglang_backend import derive_sglang_mem_fraction_static
            from aiconfigurator_core.sdk.perf_database import load_system_spec

            capacity = int(load_system_spec(self.config.gpu)["gpu"]["mem_capacity"])
            value = derive_sglang_mem_fraction_static(capacity, tp_size=self.config.tp)
        return kind, value

    def kv_cache_tokens(self, max_batched_tokens: int, max_num_seqs: int, fraction: float | None = None) -> int:
        """KV tokens the engine's memory budget leaves after weights, activations and runtime; a model that
        does not fit is one line."""
        from aiconfigurator_core.sdk.memory import estimate_kv_cache

        kind, default = self.memory_fraction()
        cfg = self.config
        try:
            estimate = estimate_kv_cache(
                cfg.model, cfg.gpu, cfg.engine, self.data_version, max_num_tokens=max_batched_tokens,
                max_batch_size=max_num_seqs, memory_fraction_kind=kind,
                memory_fraction_value=fraction if fraction is not None else default, tp_size=cfg.tp,
            )  # fmt: skip
        except ValueError as err:
            if "no KV budget" in str(err):
                raise UsageError(
                    f"{cfg.model} does not fit {cfg.tp} x {cfg.gpu} under {cfg.engine}: its weights and runtime "
                    "leave no memory for the KV cache; use a larger --tp"
                ) from None
            raise UsageError(f"{cfg.model} on {cfg.gpu} x{cfg.tp}: {err}") from None
        return int(estimate["total_kv_size_tokens"])


@dataclass(frozen=True, slots=True)
class _Layers:
    """The one attribute the package's dispatch-overhead rule reads of a model."""

    _num_layers: int


def support_matrix_rows(gpu: str) -> list[dict[str, str]]:
    """The package's own record of which models it checked on ``gpu`` (model, engine, version, status)."""
    import aiconfigurator_core

    path = Path(aiconfigurator_core.__file__).parent / "systems" / "support_matrix" / f"{gpu}.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))
