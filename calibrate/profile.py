"""Calibrated profiles: a backend's measured batch latency, fitted and written as a scenario layer.

The simulator's GPU holds a batch for ``pcie_in + kernel + pcie_out + per_item x n``
milliseconds. A real engine's batch time, measured end to end by ``infer-plan
calibrate``, is fitted to that same straight line (non-negative least squares on the
per-size medians), so a profile slots into the one service model: its ``[service]``
table sets ``kernel_ms`` to the fixed part, ``per_item_ms`` to the slope and the PCIe
times to zero (they are inside the measurement). A real engine's batches do not all
take the median time, and that spread is what makes a P95 worse than a P50, so the
profile also keeps the measured distribution of sample / fitted ratios as quantile
multipliers (``cycle_jitter``), which the simulator samples per batch. The measured
points and the fit's error travel in a ``[profile]`` table for people; the scenario
loader ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tomli_w
from scipy.optimize import nnls

from ..core.model import ServiceModel

__all__ = [
    "JITTER_POINTS",
    "LinearFit",
    "calibrated_model",
    "fit_batch_latency",
    "jitter_quantiles",
    "profile_toml",
    "service_table",
]

JITTER_POINTS = 21  # quantiles 0, 0.05, ..., 1 of the batch-time multiplier


@dataclass(frozen=True)
class LinearFit:
    fixed_ms: float
    per_item_ms: float
    max_relative_error: float  # worst |fit - median| / median over the measured sizes
    mean_relative_error: float

    def predict(self, sizes: np.ndarray | list[int]) -> np.ndarray:
        return self.fixed_ms + self.per_item_ms * np.asarray(sizes, dtype=float)


def fit_batch_latency(sizes: list[int], median_ms: list[float]) -> LinearFit:
    """Fixed + per-item fit of batch latency; both terms kept >= 0 (a batch never gets cheaper)."""
    n = np.asarray(sizes, dtype=float)
    y = np.asarray(median_ms, dtype=float)
    # Relative least squares: each size weighs the same whatever its latency.
    weights = 1.0 / np.maximum(y, 1e-9)
    design = np.column_stack([np.ones_like(n), n]) * weights[:, None]
    (fixed, slope), _ = nnls(design, y * weights)
    rel = np.abs(fixed + slope * n - y) / np.maximum(y, 1e-9)
    return LinearFit(float(fixed), float(slope), float(rel.max()), float(rel.mean()))


def jitter_quantiles(fit: LinearFit, samples_ms: dict[int, list[float]], points: int = JITTER_POINTS) -> list[float]:
    """Quantiles of measured / fitted batch time over every sample of every size."""
    ratios = np.concatenate(
        [np.asarray(v, dtype=float) / max(float(fit.predict([s])[0]), 1e-9) for s, v in samples_ms.items()]
    )
    return [round(float(x), 4) for x in np.quantile(ratios, np.linspace(0.0, 1.0, points))]


def service_table(fit: LinearFit, jitter: list[float]) -> dict[str, object]:
    """The service parameters a profile sets: the fitted line and its spread; PCIe is inside the measurement."""
    return {
        "pcie_in_ms": 0.0,
        "kernel_ms": round(fit.fixed_ms, 4),
        "pcie_out_ms": 0.0,
        "per_item_ms": round(fit.per_item_ms, 5),
        "cycle_jitter": jitter,
    }


def calibrated_model(model: ServiceModel, fit: LinearFit, jitter: list[float]) -> ServiceModel:
    """``model`` with a profile applied, as ``--profile`` would apply the file (validated the same way)."""
    return ServiceModel(**{**model.model_dump(), **service_table(fit, jitter)})


def profile_toml(fit: LinearFit, jitter: list[float], measured: dict[str, object]) -> str:
    """The profile file's text: the [service] layer the simulator reads, then the evidence."""
    service = service_table(fit, jitter)
    header = (
        "# Calibrated profile written by `infer-plan calibrate`.\n"
        "# Use it with: infer-plan simulate|capacity|loadtest --profile THIS_FILE\n"
        f"# batch latency = {fit.fixed_ms:.3f} ms + {fit.per_item_ms:.4f} ms x batch size "
        f"(max relative error {fit.max_relative_error:.1%})\n"
    )
    return header + tomli_w.dumps({"service": service, "profile": measured})
