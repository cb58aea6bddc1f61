"""``infer-plan loadtest --sweep``: the flags of a sweep and what the command does with them.

The sweep's steps are the load test the other flags describe (``--duration`` is one
step's length, ``--rps`` the lowest rate); this module only adds the search's bounds and
runs :func:`~infer_plan.loadtests.sweep.run_sweep`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ..core.errors import UsageError
from .output import render_result, write_result_files
from .progress import status_progress

if TYPE_CHECKING:
    from ..loadtests.spec import LoadTestSpec

__all__ = ["EXIT_INTERRUPTED", "EXIT_TARGET_FAILED", "sweep_load"]

SweepOpt = Annotated[
    bool, typer.Option("--sweep", help="Find the highest rate at which every SLO set holds (the knee), step by step.")
]
RatesOpt = Annotated[str | None, typer.Option("--rates", help="Sweep these rates (R1,R2,...) instead of searching.")]
MaxRpsOpt = Annotated[float | None, typer.Option("--max-rps", min=0.001, help="Sweep no rate above this.")]
MaxSweepOpt = Annotated[float, typer.Option("--max-duration", min=1, help="Seconds the whole sweep may take.")]
MinKneeOpt = Annotated[
    float | None, typer.Option("--min-knee-rps", min=0, help="Sweep gate: fail (exit 1) below this knee.")
]
StepPrecisionOpt = Annotated[
    float,
    typer.Option("--step-precision", min=0.01, max=0.5, help="Relative half-width a step's P95 needs to decide."),
]

EXIT_TARGET_FAILED = 3
EXIT_INTERRUPTED = 130
DEFAULT_STEP_S = 10.0


def parse_rates(text: str | None) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--rates takes numbers separated by commas, got {text!r}") from None


def sweep_load(
    base: LoadTestSpec,
    *,
    rates: str | None,
    max_rps: float | None,
    max_duration: float,
    min_knee_rps: float | None,
    precision: float,
    files: dict[str, Path | None],
    quiet: bool,
) -> None:
    """Run the sweep, write and show its result, and exit as documented (0, 1, 3 or 130)."""
    from ..loadtests.sweep import SweepSpec, run_sweep, simulated_knee

    spec = SweepSpec(
        base, rates=parse_rates(rates), max_rps=max_rps, max_duration_s=max_duration, precision=precision,
        min_knee_rps=min_knee_rps,
    )  # fmt: skip
    console = Console(stderr=True)
    with status_progress("sweep", enabled=not quiet) as bar:

        def say(line: str) -> None:
            bar.update(bar.task_ids[0], description=line)
            if line.startswith(("step", "saturation")) and not quiet and not console.is_terminal:
                console.print(line)

        result = run_sweep(spec, progress=say)
    if result.knee_rps is not None or result.outcome == "below_every_rate":
        result = result.model_copy(update={"simulated_knee_rps": simulated_knee(spec)})
    write_result_files(result, **files)
    render_result(result)
    if result.outcome == "target_failed":
        raise typer.Exit(EXIT_TARGET_FAILED)
    if result.outcome == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if not result.passed:
        raise typer.Exit(1)
