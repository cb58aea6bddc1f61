"""The dispatch rule (SPEC section 2) as one pure decision, shared by every batcher.

A batch leaves as soon as a GPU is free *and* either ``max_batch`` requests are queued
or the oldest queued request has waited ``max_wait``; it takes up to ``max_batch``
requests by priority: enterprise first, then paid, then free, FIFO inside a tier.

:func:`decide` is that sentence and nothing more: given the queue's state, the time and
whether a GPU is free, take *n* now or wait until *t*. The simulator's engine, the
per-request reference model, the server's in-memory queue and its Redis queue all
follow it; the Redis queue runs it as Lua inside Redis (it must be atomic there), and a
shared table of cases holds that copy to this one (``tests/core/test_rule_tables.py``).
Times are seconds on whatever clock the caller keeps (simulated, ``loop.time()``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EPS", "DispatchRule", "Take", "Wait", "decide", "take_by_priority"]

EPS = 1e-9  # simulated clocks land on exact deadlines; float noise must not delay a due batch


@dataclass(frozen=True, slots=True)
class DispatchRule:
    max_batch: int
    max_wait_s: float


# Take and Wait are values; not frozen, because the simulator makes one per decision and a frozen
# dataclass costs twice as much to build (object.__setattr__ per field).
@dataclass(slots=True)
class Take:
    """Take ``n`` requests now (by priority, :func:`take_by_priority`)."""

    n: int


@dataclass(slots=True)
class Wait:
    """Nothing is due before ``until`` unless the queue or the fleet changes first (``inf``: only then)."""

    until: float


NOTHING_DUE = Wait(math.inf)


def decide(rule: DispatchRule, queued: int, oldest: float, now: float, gpu_free: bool) -> Take | Wait:
    """The dispatch decision for ``queued`` waiting requests whose oldest arrived at ``oldest``.

    ``Wait(until)`` names the oldest request's deadline: the batch is due then even if
    nothing else happens; a full queue or a freed GPU makes it due earlier, and the
    caller, who sees those events, asks again.
    """
    if queued <= 0 or not gpu_free:
        return NOTHING_DUE
    if queued >= rule.max_batch:
        return Take(rule.max_batch)
    deadline = oldest + rule.max_wait_s
    if now + EPS >= deadline:
        return Take(queued)
    return Wait(deadline)


def take_by_priority(depths: Sequence[int], n: int) -> list[int]:
    """How many to take from each tier's queue (priority order) to take ``n``: the highest tiers first."""
    counts = []
    for depth in depths:
        m = depth if depth < n else n  # min(): a hot path of the simulator, where a builtin call shows
        counts.append(m)
        n -= m
    return counts
