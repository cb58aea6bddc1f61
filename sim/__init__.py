"""Simulator and capacity planner for a batched inference service (SPEC sections 2 and 3).

The service model it simulates lives in :mod:`infer_plan.core`, shared with the server
and the load tests.
"""

from .inputs.schedule import RateSchedule
from .inputs.workload import Workload
from .runner import RunSettings, run_simulation

__all__ = ["RateSchedule", "RunSettings", "Workload", "run_simulation"]
