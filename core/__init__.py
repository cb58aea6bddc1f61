"""What the simulator, the server and the load-test harness must agree on, defined once (SPEC section 11).

The service model and its formulas (:mod:`.model`), tiers (:mod:`.tiers`), the
admission zones (:mod:`.admission`), the dispatch decision (:mod:`.dispatch`), the
request record (:mod:`.records`), the latency summary (:mod:`.stats`), the result
schema (:mod:`.schema`) and the user-facing errors (:mod:`.errors`). This package
imports nothing else of infer-plan's; everything else imports it (checked by
``lint-imports``, contracts in ``pyproject.toml``).
"""

from .dispatch import DispatchRule, Take, Wait, decide, take_by_priority
from .errors import ConfigError, InferPlanError, UsageError
from .model import AutoscalePolicy, Backpressure, Faults, ServiceModel
from .records import Outcome, RequestRecords
from .tiers import TIER_NAMES, Tier

__all__ = [
    "TIER_NAMES",
    "AutoscalePolicy",
    "Backpressure",
    "ConfigError",
    "DispatchRule",
    "Faults",
    "InferPlanError",
    "Outcome",
    "RequestRecords",
    "ServiceModel",
    "Take",
    "Tier",
    "UsageError",
    "Wait",
    "decide",
    "take_by_priority",
]
