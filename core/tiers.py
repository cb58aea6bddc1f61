"""Customer tiers: who is served first when a batch is formed, and who is shed first under load."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["TIER_NAMES", "Tier"]


class Tier(IntEnum):
    """Customer tiers; the integer value is the priority (lower is served first).

    Being an ``IntEnum`` lets the simulator keep tiers as an ``int8`` numpy column and
    compare them with ``<=`` (the admission zones admit "this tier or better").
    """

    ENTERPRISE = 0
    PAID = 1
    FREE = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Tier:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            valid = ", ".join(t.label for t in cls)
            raise ValueError(f"unknown tier {name!r} (valid: {valid})") from None


TIER_NAMES: tuple[str, ...] = tuple(t.label for t in Tier)
