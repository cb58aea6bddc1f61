"""``infer-plan profile``: a profile for a model, GPU, tensor-parallel degree and engine one does not own.

The step model is fitted to NVIDIA AIConfigurator's measured kernel data (the
``hardware`` extra); the result is the same file ``calibrate`` writes, so ``simulate``,
``capacity``, ``serve --profile`` and ``loadtest --profile`` take it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from ..calibrate.derive import DerivedProfile, derive_profile
from ..calibrate.hardware import HardwareConfig, available
from ..core.errors import UsageError
from .options import QuietOpt
from .output import terminal
from .progress import status_progress


def profile(
    model: Annotated[
        str | None,
        typer.Option("--model", help="A model the package ships (profile --list) or a folder with its config.json."),
    ] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU as the package names it, e.g. h100_sxm.")] = None,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel degree: GPUs per replica.")] = 1,
    engine: Annotated[str, typer.Option("--engine", help="vllm, sglang or trtllm.")] = "vllm",
    out: Annotated[Path | None, typer.Option("--out", help="Write the profile here (TOML).")] = None,
    memory_fraction: Annotated[
        float | None,
        typer.Option(
            "--memory-fraction",
            min=0.05,
            max=1.0,
            help="Share of GPU memory the engine manages [default: the engine's own, e.g. vLLM 0.92].",
        ),
    ] = None,
    step_overhead_ms: Annotated[
        float,
        typer.Option("--step-overhead-ms", min=0.0, help="Host time per engine step beyond the GPU's [default: 0]."),
    ] = 0.0,
    dispatch_overhead_ms: Annotated[
        float | None,
        typer.Option(
            "--dispatch-overhead-ms",
            min=0.0,
            help="Per-request dispatch time before the first step [default: the package's figure].",
        ),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the GPUs, engines and models with data; exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the fit and the profile as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Derive a profile from measured kernel data: the step model fitted over P 0..8192, N 0..256, context 512..8192."""
    if list_:
        _show_available(json_out)
        return
    if model is None or gpu is None:
        raise UsageError("profile needs --model and --gpu (see infer-plan profile --list), or --list")
    config = HardwareConfig(model=model, gpu=gpu, tp=tp, engine=engine)
    with status_progress(f"fitting the step model of {model} on {tp} x {gpu} ({engine})", enabled=not quiet):
        derived = derive_profile(config, memory_fraction=memory_fraction, step_overhead_ms=step_overhead_ms,
                                 dispatch_overhead_ms=dispatch_overhead_ms)  # fmt: skip
    if out is not None:
        out.write_text(derived.toml(), encoding="utf-8")
    if json_out:
        print(json.dumps(_as_json(derived), indent=2))
    elif not quiet:
        _show_fit(derived, out)


def _regions(derived: DerivedProfile) -> dict[str, np.ndarray]:
    cells, errors = derived.cells, derived.relative_errors
    kinds = {
        "decode only": [c.prefill == 0 for c in cells],
        "prefill only": [c.prefill > 0 and c.decoding == 0 and c.prefix == 0 for c in cells],
        "prefill beside decode": [c.prefill > 0 and c.decoding > 0 for c in cells],
        "chunk after a prefix": [c.prefix > 0 for c in cells],
    }
    return {name: errors[np.array(mask)] for name, mask in kinds.items()}


def _show_fit(derived: DerivedProfile, out: Path | None) -> None:
    console, errors, service = terminal(), derived.relative_errors, derived.service
    table = Table(title=f"Step-model fit against {len(errors)} step estimates of {derived.provenance['source']}")
    for column in ("steps", "cells", "max error", "mean error"):
        table.add_column(column, justify="left" if column == "steps" else "right")
    for name, region in _regions(derived).items():
        table.add_row(name, str(region.size), f"{region.max():.1%}", f"{region.mean():.1%}")
    table.add_row("all", str(errors.size), f"{errors.max():.1%}", f"{errors.mean():.1%}", style="bold")
    console.print(table)
    worst = np.argsort(-errors)[:3]
    for i in worst:
        c = derived.cells[i]
        console.print(f"  worst: P {c.prefill}, N {c.decoding} at context {c.context}, prefix {c.prefix}: "
                      f"{c.ms:.2f} ms, fitted {derived.fitted_ms[i]:.2f} ({errors[i]:.1%})")  # fmt: skip
    p = derived.provenance
    console.print(
        f"replica: {p['tensor_parallelism']} x {p['gpu']}, {p['engine']}, {p['quantization']}; "
        f"KV {service['kv_cache_tokens']:,} tokens ({p['memory_fraction']}); max_num_seqs {service['max_num_seqs']}, "
        f"max_batched_tokens {service['max_batched_tokens']} (the engine's defaults); host: "
        f"{p['step_overhead_ms']:g} ms a step, {p['dispatch_overhead_ms']:g} ms a request before its first step"
    )
    if out is not None:
        console.print(f"profile written to {out} (use it: infer-plan capacity --profile {out} --rps R)")


def _as_json(derived: DerivedProfile) -> dict[str, object]:
    errors = derived.relative_errors
    return {
        "service": derived.service,
        "profile": derived.provenance,
        "fit": {
            "terms": derived.terms,
            "max_relative_error": float(errors.max()),
            "mean_relative_error": float(errors.mean()),
            "regions": {
                name: {"cells": int(r.size), "max": float(r.max()), "mean": float(r.mean())}
                for name, r in _regions(derived).items()
            },
            "cells": [
                {
                    "prefill": c.prefill,
                    "decoding": c.decoding,
                    "context": c.context,
                    "prefix": c.prefix,
                    "ms": c.ms,
                    "fitted_ms": f,
                }
                for c, f in zip(derived.cells, derived.fitted_ms, strict=True)
            ],
        },
    }


def _show_available(json_out: bool) -> None:
    systems, models = available()
    if json_out:
        print(json.dumps({"gpus": systems, "models": models}, indent=2))
        return
    console = terminal()
    table = Table(title="GPUs with measured data, per engine (data versions)")
    engines = sorted({e for by_engine in systems.values() for e in by_engine})
    table.add_column("gpu")
    for engine in engines:
        table.add_column(engine)
    for gpu, by_engine in systems.items():
        table.add_row(gpu, *(", ".join(by_engine.get(engine, ["-"])) for engine in engines))
    console.print(table)
    console.print(f"{len(models)} models shipped (--model NAME, or a folder holding a config.json):")
    console.print(", ".join(models), soft_wrap=True)
