"""Calibrated profiles: a backend's measured batch latency, fitted and written as a scenario layer.

The simulator's GPU holds a static batch of n requests, each with a p-token prompt and
an o-token answer, for

    (pcie_in + kernel + pcie_out) + per_item x n
    + decode_step x o + prefill_per_token x n p + decode_per_seq x n o

milliseconds (SPEC section 10: the hold, one prefill step, o - 1 decode steps). A real
engine's batch time, measured end to end by ``infer-plan calibrate``, is fitted to that
same form by non-negative least squares over the measured cells' medians, so a profile
slots into the one service model: its ``[service]`` table sets ``kernel_ms`` to the
fixed part, ``per_item_ms`` and the three token coefficients to their fitted values and
the PCIe times to zero (they are inside the measurement). Without token lengths (a
size-only calibration) the form is the straight line ``fixed + per_item x n``.

A real engine's batches do not all take the median time, and that spread is what makes
a P95 worse than a P50, so the profile also keeps the measured distribution of sample /
fitted ratios as quantile multipliers (``cycle_jitter``), which the simulator samples
per batch. The measured cells and the fit's error travel in a ``[profile]`` table for
people; the scenario loader ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tomli_w

from ..core.model import ServiceModel

__all__ = [
    "JITTER_POINTS",
    "Cell",
    "LinearFit",
    "PhaseSplit",
    "calibrated_model",
    "continuous_profile_toml",
    "continuous_table",
    "fit_batch_latency",
    "jitter_quantiles",
    "profile_toml",
    "service_table",
]

JITTER_POINTS = 21  # quantiles 0, 0.05, ..., 1 of the batch-time multiplier


class PhaseSplit(NamedTuple):
    """A batch's fixed cost by phase (ms), as the service model holds it."""

    pcie_in_ms: float
    kernel_ms: float
    pcie_out_ms: float


class Cell(NamedTuple):
    """One kind of measured batch: its size and, in a token calibration, each request's lengths."""

    size: int
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def tokens(self) -> bool:
        return self.prompt_tokens is not None


@dataclass(frozen=True)
class LinearFit:
    """Batch time as a sum of non-negative costs; the token terms are 0 in a size-only fit."""

    fixed_ms: float
    per_item_ms: float
    max_relative_error: float  # worst |fit - median| / median over the measured cells
    mean_relative_error: float
    decode_step_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    decode_ms_per_seq: float = 0.0
    tokens: bool = False  # fitted with the token terms (cells with prompt and output lengths)

    def predict(self, cells: Sequence[Cell | int]) -> np.ndarray:
        coefficients = [self.fixed_ms, self.per_item_ms, self.decode_step_ms, self.prefill_ms_per_token]
        return _design(cells, tokens=True) @ np.array([*coefficients, self.decode_ms_per_seq])


def _design(cells: Sequence[Cell | int], *, tokens: bool) -> np.ndarray:
    """Columns 1, n and, for tokens, o, n p, n o: the static batch time of SPEC section 10 is linear in them."""
    cells = [c if isinstance(c, Cell) else Cell(int(c)) for c in cells]
    n = np.array([c.size for c in cells], dtype=float)
    columns = [np.ones_like(n), n]
    if tokens:
        p = np.array([c.prompt_tokens or 0 for c in cells], dtype=float)
        o = np.array([c.output_tokens or 0 for c in cells], dtype=float)
        columns += [o, n * p, n * o]
    return np.column_stack(columns)


def fit_batch_latency(cells: Sequence[Cell | int], median_ms: Sequence[float]) -> LinearFit:
    """The non-negative fit of batch time to the cells' medians (a batch never gets cheaper as it grows).

    Relative least squares: each cell weighs the same whatever its latency, so the
    small batches that set the fixed cost are not drowned by the large ones.
    """
    cells = [c if isinstance(c, Cell) else Cell(int(c)) for c in cells]
    tokens = any(c.tokens for c in cells)
    y = np.asarray(median_ms, dtype=float)
    weights = 1.0 / np.maximum(y, 1e-9)
    design = _design(cells, tokens=tokens)
    from scipy.optimize import nnls  # loads on use: a third of a second every other command would pay

    coefficients, _ = nnls(design * weights[:, None], y * weights)
    rel = np.abs(design @ coefficients - y) / np.maximum(y, 1e-9)
    fixed, per_item, *token_terms = (float(c) for c in coefficients)
    return LinearFit(fixed, per_item, float(rel.max()), float(rel.mean()), *token_terms, tokens=tokens)


def jitter_quantiles(fit: LinearFit, samples_ms: dict[Cell, list[float]], points: int = JITTER_POINTS) -> list[float]:
    """Quantiles of measured / fitted batch time over every sample of every cell."""
    cells = list(samples_ms)
    fitted = np.maximum(fit.predict(cells), 1e-9)
    ratios = np.concatenate([np.asarray(samples_ms[c], dtype=float) / f for c, f in zip(cells, fitted, strict=True)])
    return [round(float(x), 4) for x in np.quantile(ratios, np.linspace(0.0, 1.0, points))]


def service_table(fit: LinearFit, jitter: list[float], split: PhaseSplit | None = None) -> dict[str, object]:
    """The service parameters a profile sets: the fitted costs and their spread.

    Without a phase split PCIe is inside the measured kernel time (an engine that does
    not say where its time goes); with one, each phase gets its own share.
    """
    phases = split or PhaseSplit(0.0, fit.fixed_ms, 0.0)
    table: dict[str, object] = {
        "pcie_in_ms": round(phases.pcie_in_ms, 4),
        "kernel_ms": round(phases.kernel_ms, 4),
        "pcie_out_ms": round(phases.pcie_out_ms, 4),
        "per_item_ms": round(fit.per_item_ms, 5),
    }
    if fit.tokens:
        table |= {
            "decode_step_ms": round(fit.decode_step_ms, 5),
            "prefill_ms_per_token": round(fit.prefill_ms_per_token, 7),
            "decode_ms_per_seq": round(fit.decode_ms_per_seq, 6),
        }
    return table | {"cycle_jitter": jitter}


def calibrated_model(model: ServiceModel, fit: LinearFit, jitter: list[float]) -> ServiceModel:
    """``model`` with a profile applied, as ``--profile`` would apply the file (validated the same way)."""
    return ServiceModel(**{**model.model_dump(), **service_table(fit, jitter)})


def profile_toml(
    fit: LinearFit, jitter: list[float], measured: dict[str, object], split: PhaseSplit | None = None
) -> str:
    """The profile file's text: the [service] layer the simulator reads, then the evidence."""
    if fit.tokens:
        form = (
            f"# static batch time = {fit.fixed_ms:.3f} ms + {fit.per_item_ms:.4f} ms x n "
            f"+ {fit.decode_step_ms:.4f} ms x output + {fit.prefill_ms_per_token:.6f} ms x n x prompt "
            f"+ {fit.decode_ms_per_seq:.5f} ms x n x output\n"
            "# step time (continuous batching) = decode_step_ms + prefill_ms_per_token x prefilled tokens "
            "+ decode_ms_per_seq x sequences\n"
        )
    else:
        form = f"# batch latency = {fit.fixed_ms:.3f} ms + {fit.per_item_ms:.4f} ms x batch size\n"
    header = (
        "# Calibrated profile written by `infer-plan calibrate`.\n"
        "# Use it with: infer-plan simulate|capacity|loadtest --profile THIS_FILE\n"
        f"{form}# fit error: max {fit.max_relative_error:.1%}, mean {fit.mean_relative_error:.1%} over the cells\n"
    )
    return header + tomli_w.dumps({"service": service_table(fit, jitter, split), "profile": measured})


def _rounded(value: float) -> float:
    """Seven decimals, or six significant digits for the tiny terms (an attention term is ~1e-6 ms)."""
    return round(value, 7) if abs(value) >= 1e-3 or value == 0 else float(f"{value:.6g}")


def continuous_table(terms: dict[str, float | tuple[float, ...]], limits: dict[str, int]) -> dict[str, object]:
    """The [service] table of a continuous engine's profile: complete, so it plans without hand edits.

    Continuous batching has no batch cycle (PCIe and kernel terms 0); the step and
    overhead terms come from the fit, the limits from the engine or its flags.
    """
    rounded = {name: _rounded(value) if isinstance(value, float) else list(value) for name, value in terms.items()}
    return {"batching": "continuous", "pcie_in_ms": 0.0, "kernel_ms": 0.0, "pcie_out_ms": 0.0, "per_item_ms": 0.0,
            **rounded, **limits}  # fmt: skip


def continuous_profile_toml(
    terms: dict[str, float | tuple[float, ...]], limits: dict[str, int], evidence: dict[str, object]
) -> str:
    """A continuous engine's profile file: the [service] layer, then the evidence in [profile]."""
    header = (
        "# Calibrated profile of a continuous-batching engine, written by `infer-plan calibrate`.\n"
        "# Use it with: infer-plan simulate|capacity|loadtest --profile THIS_FILE\n"
        "# step time = decode_step_ms + prefill_ms_per_token x prefilled tokens + decode_ms_per_seq x sequences\n"
        "#   + admit_ms_per_request x requests the step admits (+ idle_wake_ms if it starts an idle engine);\n"
        "# a request joins the engine request_overhead_ms + tokenize_ms_per_token x prompt tokens after it arrives.\n"
    )
    return header + tomli_w.dumps({"service": continuous_table(terms, limits), "profile": evidence})
