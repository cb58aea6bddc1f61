"""Simulator and capacity planner for a batched inference service (SPEC sections 2 and 3)."""

from .params import AutoscalePolicy, Backpressure, Faults, ServiceModel, Tier
from .runner import RunSettings, Workload, run_simulation
from .schedule import RateSchedule

__all__ = [
    "AutoscalePolicy",
    "Backpressure",
    "Faults",
    "RateSchedule",
    "RunSettings",
    "ServiceModel",
    "Tier",
    "Workload",
    "run_simulation",
]
