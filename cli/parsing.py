"""Flag values with a small syntax of their own (``--tier-mix``, ``--spike``, ``--sizes``), parsed into data.

Each raises a :class:`~infer_plan.core.errors.UsageError` naming its flag, since only
the CLI knows the flag a value came from.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import UsageError

__all__ = ["parse_int_list", "parse_spike", "parse_tier_mix"]


def parse_tier_mix(text: str, flag: str = "--tier-mix") -> dict[str, float]:
    """``enterprise=0.1,paid=0.3,free=0.6`` -> mapping; the shares are checked by the service model."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"{flag}: expected name=value, got {part!r}")
        try:
            mix[name.strip().lower()] = float(value)
        except ValueError:
            raise UsageError(f"{flag}: value for {name.strip()!r} is not a number: {value!r}") from None
    if not mix:
        raise UsageError(f"{flag}: empty")
    return mix


def parse_spike(text: str) -> dict[str, Any]:
    """``3:120:60`` -> a 3x spike starting at 120 s lasting 60 s (as a schedule segment)."""
    parts = text.replace("x", "").split(":")
    if len(parts) != 3:
        raise UsageError(f"--spike: expected FACTOR:AT_S:DURATION_S (e.g. 3:120:60), got {text!r}")
    try:
        factor, at_s, duration_s = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--spike: numbers expected in {text!r}") from None
    return {"kind": "spike", "factor": factor, "at_s": at_s, "duration_s": duration_s}


def parse_int_list(text: str, flag: str) -> list[int]:
    """``1,10,100`` -> sorted distinct integers."""
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
