"""Per-key limits: a token bucket for the rate and a cap on requests in flight.

Priority and the admission zones act per tier, so without a limit per key one client
in a loop fills its tier's share and every other customer of the tier waits or is shed.
Gateways of this field limit per key (LiteLLM's rpm, Ray Serve's
``max_ongoing_requests``); so does the server, before a request is queued.

The bucket rule lives here once. The server applies it in memory
(:mod:`infer_plan.server.access.key_limiter`) and, for instances sharing Redis, as Lua
(:mod:`infer_plan.server.queues.shared_scripts`), held to this function by
``tests/core/test_rule_tables.py``. The simulator knows nothing of keys: a key's
throughput is at most ``rps`` (plus ``burst`` once), which is how to read a limit into
a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["BucketTake", "KeyLimits", "bucket_take", "retry_after_header"]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one key may do: ``rps`` sustained with ``burst`` at once, at most ``max_in_flight`` unanswered.

    ``None`` means no limit of that kind. ``burst`` defaults to one second's worth of
    ``rps`` (at least 1), the usual choice of token-bucket gateways.
    """

    rps: float | None = None
    burst: float | None = None
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.rps is not None and not (math.isfinite(self.rps) and self.rps > 0):
            raise ConfigError(f"rps must be a number > 0, not {self.rps!r}")
        if self.burst is not None:
            if self.rps is None:
                raise ConfigError("burst needs rps: it is the bucket's size at that rate")
            if not (math.isfinite(self.burst) and self.burst >= 1):
                raise ConfigError(f"burst must be a number >= 1, not {self.burst!r}")
        elif self.rps is not None:
            object.__setattr__(self, "burst", max(1.0, float(self.rps)))
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be an integer >= 1, not {self.max_in_flight!r}")

    @property
    def limited(self) -> bool:
        return self.rps is not None or self.max_in_flight is not None


@dataclass(frozen=True, slots=True)
class BucketTake:
    """One request's pass at the bucket: admitted or not, the tokens left, and when one will be there."""

    admitted: bool
    tokens: float
    retry_after_s: float  # 0 when admitted


def bucket_take(tokens: float, updated_s: float, now_s: float, rps: float, burst: float) -> BucketTake:
    """Refill the bucket for the time since ``updated_s`` (up to ``burst``), then take one token if there is one.

    A new key's bucket starts full (``tokens = burst``). A refused request takes
    nothing, so a client that honours ``retry_after_s`` finds its token there.
    """
    tokens = min(burst, tokens + max(0.0, now_s - updated_s) * rps)
    if tokens >= 1.0:
        return BucketTake(True, tokens - 1.0, 0.0)
    return BucketTake(False, tokens, (1.0 - tokens) / rps)


def retry_after_header(seconds: float) -> int:
    """``Retry-After`` in whole seconds (RFC 9110 delay-seconds), rounded up so honouring it always suffices."""
    return max(1, math.ceil(seconds - 1e-9))
