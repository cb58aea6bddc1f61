"""Simulator and capacity planner for a batched inference service (SPEC sections 2 and 3).

The service model it simulates lives in :mod:`infer_plan.core`, shared with the server
and the load tests.
"""

from .runner import RunSettings, run_simulation
from .schedule import RateSchedule
from .workload import Workload

__all__ = ["RateSchedule", "RunSettings", "Workload", "run_simulation"]
