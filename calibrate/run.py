"""One calibration, end to end: measure a backend (or read a server's traffic), fit, write the profile.

Three modes. ``static`` (static engines, the default for the sim, torch and remote
backends): a size-only calibration varies the batch size and fits ``fixed + per_item x
n``; given prompt and output lengths, it measures every (size, prompt, output) cell and
also fits the three token coefficients of SPEC section 10. ``streamed`` (continuous
engines, the default for openai and vllm): streamed requests fit the step and overhead
terms (:mod:`.streamed`) and the profile carries the engine's limits, read from the
engine where it says them. ``requests``: the same terms fitted to a load test's saved
requests (:mod:`.from_requests`), nothing sent.

:func:`run_calibration` is what ``infer-plan calibrate`` calls after parsing its flags;
it returns the typed result, with the profile written to ``spec.out``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InferPlanError, UsageError
from ..core.model import Batching, ServiceModel
from ..core.schema import CalibrationPoint, CalibrationResult
from ..server.backends.base import Backend, BackendError
from .measure import BatchTimings, TooFewSizesError, measure_batches, served_batch_timings
from .profile import Cell, continuous_profile_toml, profile_toml
from .streamed import MIXED_OUTPUT, ContinuousFit, StreamPlan, fit_continuous, measure_streams

__all__ = ["DEFAULT_SIZES", "LIMITS", "CalibrationSpec", "calibration_cells", "calibration_mode", "run_calibration"]

DEFAULT_SIZES = (1, 2, 5, 10, 20, 50, 100)
DEFAULT_TOKEN_SIZES = (1, 8, 32)  # a token calibration measures sizes x prompts x outputs cells
DEFAULT_PROMPTS = (32, 256)
DEFAULT_OUTPUTS = (1, 16)
STREAMED_BACKENDS = ("openai", "vllm")  # engines that batch continuously themselves: calibrated by streams
NOT_STREAMING = ("sim", "remote", "torch")  # static batches only (the sim backend streams a static batch's steps)
DEFAULT_STREAM_PROMPTS = (16, 128, 384)
DEFAULT_DECODE_TOKENS = 48  # a decoder's answer: long enough to outlast a newcomer's overheads and prefill
MAX_DEFAULT_CONCURRENCY = 64  # default decode cells stop here even for an engine of 256 slots
LIMITS = ("max_num_seqs", "max_batched_tokens", "kv_cache_tokens")  # what a continuous profile carries


@dataclass(frozen=True)
class CalibrationSpec:
    """What to measure and where the profile goes.

    Synthetic batches against ``backend`` (built with ``backend_options``), or, with
    ``traffic_url``, the batches a running server served its clients in its last
    ``window_s`` seconds (nothing is run).
    """

    out: Path
    model: ServiceModel = field(default_factory=ServiceModel)
    backend: str = "sim"
    backend_options: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None  # recorded in the profile's evidence
    sizes: list[int] | None = None  # None: DEFAULT_SIZES (DEFAULT_TOKEN_SIZES with tokens) up to max_batch
    prompt_tokens: list[int] | None = None  # either set: a token calibration (the other one's default fills in)
    output_tokens: list[int] | None = None
    repetitions: int = 10
    warmup_batches: int = 2
    traffic_url: str | None = None
    window_s: float = 300.0
    batching: Batching | None = None  # None: continuous for the openai and vllm backends, else static
    limits: dict[str, int] = field(default_factory=dict)  # the engine's limits as flags (they outrank the engine)
    requests_files: list[Path] = field(default_factory=list)  # load tests' --save-requests CSVs: fit them, send nothing
    contexts: list[int] | None = None  # streamed: the decoders' prompts, to fit the context terms (SPEC section 12)


def calibration_mode(spec: CalibrationSpec) -> str:
    """``requests``, ``streamed`` or ``static`` (module docstring)."""
    batching = spec.batching or (Batching.CONTINUOUS if spec.backend in STREAMED_BACKENDS else Batching.STATIC)
    mode = "requests" if spec.requests_files else "static" if batching is Batching.STATIC else "streamed"
    if spec.contexts and mode != "streamed":
        raise UsageError("--contexts spans a continuous engine's streamed cells: drop it, or calibrate by streaming "
                         "(--backend openai --upstream URL, or vllm)", field="contexts")  # fmt: skip
    if mode == "streamed" and spec.backend in NOT_STREAMING:
        raise UsageError(
            f"the {spec.backend} backend runs static batches: a continuous engine is calibrated by streaming to it "
            "(--backend openai --upstream URL, or vllm)",
            field="batching",
        )
    return mode


def calibration_cells(spec: CalibrationSpec) -> list[Cell]:
    """The cells to measure: sizes alone, or every size x prompt length x output length."""
    tokens = spec.prompt_tokens is not None or spec.output_tokens is not None
    defaults = DEFAULT_TOKEN_SIZES if tokens else DEFAULT_SIZES
    top = min(spec.model.max_batch, defaults[-1]) if tokens else spec.model.max_batch
    sizes = spec.sizes or sorted({s for s in defaults if s <= top} | {top})
    _at_least_two(sizes, "batch sizes", "sizes", "a batch's fixed cost from its per-request cost")
    if not tokens:
        return [Cell(s) for s in sizes]
    prompts, outputs = spec.prompt_tokens or list(DEFAULT_PROMPTS), spec.output_tokens or list(DEFAULT_OUTPUTS)
    _at_least_two(prompts, "prompt lengths", "prompt_tokens", "the prefill cost from the per-request cost")
    _at_least_two(outputs, "output lengths", "output_tokens", "the decode step from the fixed cost")
    return [Cell(n, p, o) for n in sizes for p in prompts for o in outputs]


def _at_least_two(values: list[int], what: str, name: str, why: str) -> None:
    if len(set(values)) < 2 or min(values) < 1:
        raise UsageError(f"needs at least two {what}, different and >= 1, to tell {why}", field=name)


def run_calibration(spec: CalibrationSpec, *, on_batch: Callable[[], None] | None = None) -> CalibrationResult:
    """Measure, fit the batch costs and their spread (or a continuous engine's terms), write the profile."""
    mode = calibration_mode(spec)
    if mode == "streamed":
        return _run_streamed(spec, on_batch)
    if mode == "requests":
        from .from_requests import run_from_requests

        return run_from_requests(spec)
    if spec.traffic_url is not None:
        if spec.prompt_tokens or spec.output_tokens:
            raise UsageError("a server's batch log holds batch sizes only: calibrate tokens with synthetic batches")
        timings = asyncio.run(_served(spec.traffic_url, spec.window_s))
        repetitions, warmup = min(len(v) for v in timings.samples_ms.values()), 0
        source = f"{spec.backend} (traffic, last {spec.window_s:g} s)"
    else:
        cells = calibration_cells(spec)
        engine = Backend.create(spec.backend, spec.model, spec.backend_options)
        timings = asyncio.run(_measure(engine, cells, spec.repetitions, spec.warmup_batches, on_batch))
        repetitions, warmup, source = spec.repetitions, spec.warmup_batches, spec.backend
    fit, jitter = timings.fit()
    split, phase_medians = timings.phase_split(fit), timings.phase_medians()
    cells, fitted = timings.cells, fit.predict(timings.cells)
    points = [
        CalibrationPoint(
            batch_size=c.size, prompt_tokens=c.prompt_tokens, output_tokens=c.output_tokens,
            median_ms=med, p95_ms=p95, min_ms=min(timings.samples_ms[c]), fitted_ms=f,
        )
        for c, med, p95, f in zip(cells, timings.median_ms(), timings.p95_ms(), fitted, strict=True)
    ]  # fmt: skip
    result = CalibrationResult(
        backend=source,
        model=spec.model_name,
        repetitions=repetitions,
        warmup_batches=warmup,
        points=points,
        fixed_ms=fit.fixed_ms,
        per_item_ms=fit.per_item_ms,
        decode_step_ms=fit.decode_step_ms,
        prefill_ms_per_token=fit.prefill_ms_per_token,
        decode_ms_per_seq=fit.decode_ms_per_seq,
        max_relative_error=fit.max_relative_error,
        mean_relative_error=fit.mean_relative_error,
        cycle_jitter=jitter,
        profile_path=str(spec.out),
        phases=split._asdict() if split is not None else None,
    )
    lengths = {"prompt_tokens": [c.prompt_tokens for c in cells], "output_tokens": [c.output_tokens for c in cells]}
    evidence = {
        "backend": source,
        "model": spec.model_name or "",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "batch_sizes": [c.size for c in cells],
        **(lengths if fit.tokens else {}),
        "median_ms": [round(m, 3) for m in timings.median_ms()],
        "fitted_ms": [round(float(f), 3) for f in fitted],
        "max_relative_error": round(fit.max_relative_error, 4),
    }
    if phase_medians is not None:
        evidence["phase_median_ms"] = {p: [round(m, 4) for m in v] for p, v in phase_medians.items()}
    write_profile(spec.out, profile_toml(fit, jitter, evidence, split))
    return result


def write_profile(out: Path, text: str) -> None:
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror}", field="out") from None


def _run_streamed(spec: CalibrationSpec, on_probe: Callable[[], None] | None) -> CalibrationResult:
    """Streamed cells against a continuous engine, the step and overhead fit, a complete profile."""
    model = spec.model.model_copy(update={"batching": Batching.CONTINUOUS, **spec.limits})
    engine = Backend.create(spec.backend, model, spec.backend_options)
    fit, limits, sources, plan = asyncio.run(_stream_and_fit(engine, spec, model, on_probe))
    evidence = {
        "kind": "measured",
        "backend": spec.backend,
        "model": spec.model_name or "",
        "method": "streamed requests (calibrate/streamed.py): lone TTFTs, decode gaps, mixed steps",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "limit_sources": sources,
        "cells": [f"{c.kind} n={c.sequences} prefill={c.prefill_tokens} context={c.context_tokens}" for c in fit.cells],
        "median_ms": [round(c.median_ms, 3) for c in fit.cells],
        "fitted_ms": [round(c.fitted_ms, 3) for c in fit.cells],
        "max_relative_error": round(fit.max_relative_error, 4),
    }
    write_profile(spec.out, continuous_profile_toml(fit.terms(), limits, evidence))
    return continuous_result(spec, fit, limits, sources, mode="streamed", repetitions=plan.repetitions)


def continuous_result(
    spec: CalibrationSpec, fit: ContinuousFit, limits: dict[str, int], sources: dict[str, str], *, mode: str,
    repetitions: int,
) -> CalibrationResult:  # fmt: skip
    return CalibrationResult(
        backend=spec.backend if mode == "streamed" else f"requests in {', '.join(map(str, spec.requests_files))}",
        model=spec.model_name, repetitions=repetitions, warmup_batches=0, points=[], fixed_ms=0.0, per_item_ms=0.0,
        decode_step_ms=fit.decode_step_ms, prefill_ms_per_token=fit.prefill_ms_per_token,
        decode_ms_per_seq=fit.decode_ms_per_seq, max_relative_error=fit.max_relative_error,
        mean_relative_error=fit.mean_relative_error, profile_path=str(spec.out), mode=mode,
        request_overhead_ms=fit.request_overhead_ms, tokenize_ms_per_token=fit.tokenize_ms_per_token,
        admit_ms_per_request=fit.admit_ms_per_request, cycle_jitter=list(fit.step_jitter), stream_cells=fit.cells,
        idle_wake_ms=fit.idle_wake_ms,
        decode_ms_per_kv_token=fit.context_terms.get("decode_ms_per_kv_token", 0.0),
        prefill_ms_per_token_sq=fit.context_terms.get("prefill_ms_per_token_sq", 0.0),
        limits=limits, limit_sources=sources,
    )  # fmt: skip


def resolve_limits(
    flags: dict[str, int], reported: dict[str, tuple[int, str]], model: ServiceModel
) -> tuple[dict[str, int], dict[str, str]]:
    """Each limit from its flag, else from what the engine said, else the service model's default (said so)."""
    limits, sources = {}, {}
    for name in LIMITS:
        if name in flags:
            limits[name], sources[name] = flags[name], "flag"
        elif name in reported:
            limits[name], sources[name] = reported[name]
        elif (value := getattr(model, name)) is not None:
            limits[name], sources[name] = value, "default: the engine does not say it; pass the flag of this name"
    return limits, sources


def stream_plan(spec: CalibrationSpec, limits: dict[str, int], max_model_len: int | None) -> StreamPlan:
    """The cells to stream: prompt lengths that fit the context and one step's token budget, concurrencies to max."""
    decode = max(spec.output_tokens or [DEFAULT_DECODE_TOKENS])
    top = min(limits["max_num_seqs"], MAX_DEFAULT_CONCURRENCY)
    concurrencies = spec.sizes or sorted({1, max(2, top // 2), top})
    if max(concurrencies) > limits["max_num_seqs"]:
        raise UsageError(f"--sizes goes past max_num_seqs ({limits['max_num_seqs']}): the engine would queue them",
                         field="sizes")  # fmt: skip
    _at_least_two(concurrencies, "concurrencies", "sizes", "the decode step from the per-sequence cost")
    prompts = spec.prompt_tokens or list(DEFAULT_STREAM_PROMPTS)
    longest = min(limits.get("max_batched_tokens", 1 << 30), (max_model_len or 1 << 30) - decode - 1)
    if max(prompts) > longest:
        if spec.prompt_tokens:
            raise UsageError(f"prompts of {max(prompts)} tokens do not fit one step and the context with "
                             f"{decode}-token answers (at most {longest})", field="prompt_tokens")  # fmt: skip
        prompts = sorted({min(p, longest) for p in prompts})
    _at_least_two(prompts, "prompt lengths", "prompt_tokens", "the prefill cost from the per-request cost")
    contexts = _decode_contexts(spec.contexts, limits, max(concurrencies), decode, max_model_len)
    plan = StreamPlan(prompts, concurrencies, decode, spec.repetitions)
    room = (max_model_len or 1 << 30) - plan.decoder_prompt - 1  # a mixed cell's decoders outlast its newcomer
    return StreamPlan(prompts, concurrencies, decode, spec.repetitions, max(decode, min(MIXED_OUTPUT, room)), contexts)


def _decode_contexts(
    contexts: list[int] | None, limits: dict[str, int], sequences: int, decode: int, max_model_len: int | None
) -> tuple[int, ...]:
    """``--contexts``, checked: two or more, each fitting the context window and, at the most decoders, the KV cache.

    A decode cell that overflows either would queue or preempt some decoders, and its gaps
    would not be steps of the sequences it names.
    """
    if not contexts:
        return ()
    _at_least_two(contexts, "contexts", "contexts", "the context a decode step reads from its per-sequence cost")
    longest = (max_model_len or 1 << 30) - decode - 1
    if max(contexts) > longest:
        raise UsageError(f"a context of {max(contexts)} tokens does not fit the engine's context window with "
                         f"{decode}-token answers (at most {longest})", field="contexts")  # fmt: skip
    kv = limits.get("kv_cache_tokens")
    if kv is not None and sequences * (max(contexts) + decode) > kv:
        raise UsageError(f"{sequences} decoders of {max(contexts)} + {decode} tokens overflow the KV cache "
                         f"({kv:,} tokens): lower --contexts or --sizes", field="contexts")  # fmt: skip
    return tuple(sorted(set(contexts)))


async def _stream_and_fit(
    engine: Backend, spec: CalibrationSpec, model: ServiceModel, on_probe: Callable[[], None] | None
) -> tuple[ContinuousFit, dict[str, int], dict[str, str], StreamPlan]:
    await engine.start()
    try:
        reported = await engine.engine_limits()
        limits, sources = resolve_limits(spec.limits, reported, model)
        plan = stream_plan(spec, limits, reported.get("max_model_len", (None, ""))[0])
        timings = await measure_streams(engine, plan, on_probe=on_probe)
        return fit_continuous(timings, plan), limits, sources, plan
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
    finally:
        await engine.close()


async def _measure(
    engine: Backend, cells: list[Cell], repetitions: int, warmup: int, on_batch: Callable[[], None] | None
) -> BatchTimings:
    await engine.start()
    try:
        return await measure_batches(engine, cells, repetitions, warmup, on_batch=on_batch)
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
    finally:
        await engine.close()


async def _served(url: str, window_s: float) -> BatchTimings:
    try:
        return await served_batch_timings(url, window_s)
    except TooFewSizesError as err:
        hint = "widen the window, wait for varied load, or calibrate with synthetic batches"
        raise InferPlanError(f"calibration failed: {err}: {hint}") from None
    except BackendError as err:
        raise InferPlanError(f"calibration failed: {err}") from None
