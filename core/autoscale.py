"""The autoscaling rule, once, for the simulator's fleet and the server's control loop alike.

Both call :func:`decide_scaling` every ``tick_s`` with what they both can measure: the
rate offered in the tick just ended (every arrival, shed ones included: a shed request is
load the fleet failed to take) as the load factor it puts on a number of GPUs. Up counts
serving *plus provisioning* GPUs, so a cold start in progress is not ordered twice; down
asks whether one GPU fewer would still stay under the scale-down load. Offered load rather
than busy time: a saturated fleet is 100% busy at 1.2x and at 3x its capacity alike, and
the rule must tell them apart to order enough; the offered rate is also what a planner
knows before the fact. The rule keeps no state of its own: the caller holds the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .dispatch import EPS
from .model import AutoscalePolicy

__all__ = ["ScaleClock", "ScaleDecision", "decide_scaling"]


@dataclass(frozen=True, slots=True)
class ScaleClock:
    """Since when the load has stayed above the scale-up trigger and below the scale-down one (None: it has not)."""

    above_since: float | None = None
    below_since: float | None = None
    longest_above_s: float = 0.0  # the longest the load stayed above the trigger (a run's report)


class ScaleDecision(NamedTuple):
    up: bool  # order one GPU; it serves after the cold start
    down: bool  # release one serving GPU (drained first); both only where scale_down_load >= scale_up_load
    clock: ScaleClock


def decide_scaling(
    policy: AutoscalePolicy, clock: ScaleClock, now: float, fleet: int, load_on: Callable[[int], float]
) -> ScaleDecision:
    """One tick: ``fleet`` GPUs serve or provision; ``load_on(n)`` is the tick's offered load factor on ``n`` GPUs."""
    up = down = False
    above, below, longest = clock.above_since, clock.below_since, clock.longest_above_s
    if load_on(max(fleet, 1)) > policy.scale_up_load and fleet < policy.max_gpus:
        above = now if above is None else above
        longest = max(longest, now - above)
        if now - above >= policy.scale_up_after_s - EPS:
            up, above = True, None
    else:
        above = None
    fewer = fleet - 1
    if fewer >= policy.min_gpus and load_on(fewer) < policy.scale_down_load:
        below = now if below is None else below
        if now - below >= policy.scale_down_after_s - EPS:
            down, below = True, None
    else:
        below = None
    return ScaleDecision(up, down, ScaleClock(above, below, longest))
