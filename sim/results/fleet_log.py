"""What the fleet did over a run, as the engines log it for the result: GPUs up, monitor samples, scaling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...core.schema import ScaleEvent

__all__ = ["FleetLog"]


@dataclass
class FleetLog:
    """What the fleet did over a run: GPUs up over time, the monitor's samples, the autoscaler's decisions."""

    up_changes: np.ndarray  # (time, GPUs up) after each change, first row at t=0
    timeseries: dict[str, np.ndarray] = field(default_factory=dict)
    scale_events: list[ScaleEvent] = field(default_factory=list)
    longest_above_s: float = 0.0
