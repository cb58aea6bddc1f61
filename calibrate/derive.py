"""A profile without the hardware: the extended step model fitted to AIConfigurator's step estimates.

The grid is the one SPEC section 12 holds the form to: P = 0..8192 prompt tokens prefilled
by one request, N = 0..256 decoding sequences, each holding 512..8192 context tokens,
plus chunks prefilled after a cached prefix (prefill attention against earlier tokens).
The fit minimises the largest relative error (an L2 start, then L4, L8, L16 norms of the
relative errors, each from the last), with every coefficient >= 0 so the simulator never
sees a step that shrinks as work grows. The printed errors are recomputed through
:meth:`ServiceModel.step_ms`, the formula the simulator runs, not through the fit's own
vectorised copy of it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import tomli_w

from ..core import ServiceModel
from .hardware import PACKAGE, HardwareConfig, StepOracle, package_version
from .profile import continuous_table

__all__ = ["DerivedProfile", "derive_profile", "engine_limits"]

PREFILLS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODING = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXTS = (512, 1024, 2048, 4096, 8192)
CHUNKS_AFTER_PREFIX = (128, 512, 2048)
# The fitted terms, in the order of the fit's parameter vector.
TERMS = (
    "decode_step_ms", "prefill_ms_per_token", "decode_ms_per_seq", "decode_ms_per_kv_token",
    "prefill_ms_per_token_sq", "prefill_ms_per_context_token", "step_floor_ms", "prefill_step_ms",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Cell:
    """One step shape of the grid and the package's GPU time for it."""

    prefill: int
    decoding: int
    context: int  # tokens each decoding sequence holds
    prefix: int  # cached tokens before the prefill chunk
    ms: float

    @property
    def sequences(self) -> int:
        """Sequences in the step as the engines count them: the decoding ones and the one prefilling."""
        return self.decoding + (self.prefill > 0)


@dataclass(frozen=True, slots=True)
class DerivedProfile:
    service: dict[str, object]  # the [service] table
    provenance: dict[str, object]  # the [profile] table
    terms: dict[str, float]  # the fitted step terms: GPU time only, before any host overhead
    cells: list[Cell]
    fitted_ms: list[float]  # ServiceModel.step_ms of each cell with the fitted terms (no host overhead)

    @property
    def relative_errors(self) -> np.ndarray:
        measured = np.array([c.ms for c in self.cells])
        return np.abs(np.array(self.fitted_ms) - measured) / measured

    def toml(self) -> str:
        errors = self.relative_errors
        header = (
            f"# Derived profile written by `infer-plan profile` from {PACKAGE}'s measured kernel data.\n"
            "# Use it with: infer-plan simulate|capacity|loadtest|serve --profile THIS_FILE\n"
            "# step time = hypot(step_floor_ms, decode_step_ms + prefill_step_ms [if it prefills]\n"
            "#             + prefill_ms_per_token x P + decode_ms_per_seq x N)\n"
            "#           + decode_ms_per_kv_token x K + prefill_ms_per_token_sq x sum P_i^2\n"
            "#           + prefill_ms_per_context_token x sum P_i x C_i   (SPEC section 12)\n"
            f"# fit error against its {len(errors)} step estimates: max {errors.max():.1%}, mean {errors.mean():.1%}\n"
        )
        return header + tomli_w.dumps({"service": self.service, "profile": self.provenance})


def engine_limits(engine: str, gpu_memory_gib: float, gpu: str) -> tuple[int, int]:
    """(max_num_seqs, max_batched_tokens) an engine starts with on this GPU when not told otherwise.

    vLLM's OpenAI server (``EngineArgs._set_default_max_num_seqs_and_batched_tokens_args``):
    1024 / 16384 from 160 GiB, 1024 / 8192 from 70 GiB except A100, else 256 / 2048.
    SGLang: ``chunked_prefill_size`` by capacity (2048 below 35 GiB, 4096 below 60, 8192
    below 160, else 16384) and no fixed cap on running requests (the KV cache bounds them:
    1024 here). TensorRT-LLM: ``max_batch_size`` 2048, ``max_num_tokens`` 8192.
    """
    if engine == "vllm":
        if gpu_memory_gib >= 160:
            return 1024, 16384
        if gpu_memory_gib >= 70 and not gpu.startswith("a100"):
            return 1024, 8192
        return 256, 2048
    if engine == "sglang":
        tiers = ((35, 2048), (60, 4096), (160, 8192))
        return 1024, next((chunk for below, chunk in tiers if gpu_memory_gib < below), 16384)
    return 2048, 8192


def grid(oracle: StepOracle) -> list[Cell]:
    cells = [Cell(p, n, c, 0, oracle.step_ms(p, n, c)) for c in CONTEXTS for p in PREFILLS for n in DECODING if p or n]
    cells += [Cell(p, 0, 0, c, oracle.step_ms(p, 0, 0, prefix=c)) for c in CONTEXTS for p in CHUNKS_AFTER_PREFIX]
    return cells


def _step_ms(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ServiceModel.step_ms over the grid's columns (P, N, K, P^2, P x C), vectorised for the fit."""
    base, per_token, per_seq, per_kv, per_sq, per_context, floor, prefill_step = theta
    p, n, k, sq, pc = x
    linear = base + prefill_step * (p > 0) + per_token * p + per_seq * n
    return np.hypot(floor, linear) + per_kv * k + per_sq * sq + per_context * pc


def fit_terms(cells: list[Cell]) -> dict[str, float]:
    from scipy.optimize import least_squares  # a dependency of aiconfigurator-core, so of the extra

    p = np.array([c.prefill for c in cells], dtype=float)
    n = np.array([c.sequences for c in cells], dtype=float)
    kv = np.array([c.decoding * c.context for c in cells], dtype=float)
    x = np.stack([p, n, kv, p * p, p * np.array([c.prefix for c in cells])])
    y = np.array([c.ms for c in cells])
    decode_only = y[p == 0].min()
    theta = np.array([decode_only / 3, 0.02, 0.02, 4e-5, 1e-6, 5e-7, decode_only, decode_only / 5])
    for norm in (2, 4, 8, 16):  # towards the minimax of the relative error, each from the last
        theta = least_squares(
            lambda t, q=norm: np.abs((_step_ms(t, x) - y) / y) ** (q / 2), theta, bounds=(0, np.inf),
            x_scale="jac", max_nfev=20_000,
        ).x  # fmt: skip
    return {name: float(value) for name, value in zip(TERMS, theta, strict=True)}


def derive_profile(
    config: HardwareConfig,
    *,
    memory_fraction: float | None = None,
    step_overhead_ms: float = 0.0,
    dispatch_overhead_ms: float | None = None,
) -> DerivedProfile:
    """Fit the step model for one replica and fill in the engine's limits and memory budget."""
    oracle = StepOracle(config)
    from aiconfigurator_core.sdk.perf_database import load_system_spec

    gpu_memory_gib = float(load_system_spec(config.gpu)["gpu"]["mem_capacity"]) / 2**30
    max_num_seqs, max_batched_tokens = engine_limits(config.engine, gpu_memory_gib, config.gpu)
    kind, default_fraction = oracle.memory_fraction()
    fraction = memory_fraction if memory_fraction is not None else default_fraction
    kv_tokens = oracle.kv_cache_tokens(max_batched_tokens, max_num_seqs, fraction)
    cells = grid(oracle)
    terms = fit_terms(cells)
    fitted = ServiceModel(batching="continuous", **terms)
    fitted_ms = [
        fitted.step_ms(
            c.prefill,
            c.sequences,
            kv_tokens=c.decoding * c.context,
            prefill_sq=c.prefill**2,
            prefill_context=c.prefill * c.prefix,
        )
        for c in cells
    ]
    dispatch = oracle.dispatch_overhead_ms() if dispatch_overhead_ms is None else dispatch_overhead_ms
    service_terms = {**terms, "decode_step_ms": terms["decode_step_ms"] + step_overhead_ms,
                     "request_overhead_ms": dispatch}  # fmt: skip
    limits = {"max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens, "kv_cache_tokens": kv_tokens}
    errors = np.abs(np.array(fitted_ms) - np.array([c.ms for c in cells])) / np.array([c.ms for c in cells])
    provenance: dict[str, object] = {
        "kind": "derived",
        "source": f"{PACKAGE} {package_version()} (NVIDIA AIConfigurator), {config.engine} data {oracle.data_version}",
        "model": config.model,
        "gpu": config.gpu,
        "tensor_parallelism": config.tp,
        "gpus_per_replica": config.tp,
        "engine": config.engine,
        "quantization": oracle.quantization,
        "memory_fraction": f"{fraction:g} {kind.replace('_', ' ')} GPU memory",
        "step_overhead_ms": step_overhead_ms,
        "dispatch_overhead_ms": round(dispatch, 4),
        "fit_cells": len(cells),
        "fit_max_relative_error": round(float(errors.max()), 4),
        "fit_mean_relative_error": round(float(errors.mean()), 4),
        "derived": dt.date.today().isoformat(),
    }
    return DerivedProfile(continuous_table(service_terms, limits), provenance, terms, cells, fitted_ms)
