"""Offered-rate schedules: how many requests per second arrive at each moment.

One vocabulary serves the simulator and the load generator, so a scenario file that
says "3x spike at 120 s for 60 s" means the same load to both. A schedule is a base
rate changed by segments applied in order:

- ``Step(at_s, rps)``: from ``at_s`` on, the base rate is ``rps``;
- ``Ramp(start_s, end_s, to_rps)``: linear change to ``to_rps`` over the interval;
- ``Spike(at_s, duration_s, factor)``: the rate is multiplied by ``factor`` for a while;
- ``Diurnal(amplitude, period_s, phase_s)``: multiplied by ``1 + amplitude*sin(...)``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Diurnal", "Ramp", "RateSchedule", "Segment", "Spike", "Step"]


class _Segment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Step(_Segment):
    kind: Literal["step"] = "step"
    at_s: float = Field(ge=0)
    rps: float = Field(ge=0)

    def apply(self, t: np.ndarray, rate: np.ndarray) -> np.ndarray:
        return np.where(t >= self.at_s, self.rps, rate)


class Ramp(_Segment):
    kind: Literal["ramp"] = "ramp"
    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)
    to_rps: float = Field(ge=0)

    def apply(self, t: np.ndarray, rate: np.ndarray, start_rate: float = 0.0) -> np.ndarray:
        """``start_rate`` is the rate the earlier segments give at ``start_s``."""
        if self.end_s <= self.start_s:
            raise ValueError("ramp end_s must be after start_s")
        frac = np.clip((t - self.start_s) / (self.end_s - self.start_s), 0.0, 1.0)
        ramped = start_rate + (self.to_rps - start_rate) * frac
        return np.where(t >= self.start_s, ramped, rate)


class Spike(_Segment):
    kind: Literal["spike"] = "spike"
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    factor: float = Field(gt=0)

    def apply(self, t: np.ndarray, rate: np.ndarray) -> np.ndarray:
        inside = (t >= self.at_s) & (t < self.at_s + self.duration_s)
        return np.where(inside, rate * self.factor, rate)


class Diurnal(_Segment):
    kind: Literal["diurnal"] = "diurnal"
    amplitude: float = Field(ge=0, le=1)
    period_s: float = Field(default=86_400.0, gt=0)
    phase_s: float = 0.0

    def apply(self, t: np.ndarray, rate: np.ndarray) -> np.ndarray:
        return rate * (1.0 + self.amplitude * np.sin(2 * np.pi * (t - self.phase_s) / self.period_s))


Segment = Annotated[Step | Ramp | Spike | Diurnal, Field(discriminator="kind")]


class RateSchedule(BaseModel):
    """A base rate and the segments that shape it over time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rps: float = Field(ge=0, description="base offered rate, requests per second")
    segments: tuple[Segment, ...] = ()

    @property
    def is_constant(self) -> bool:
        return not self.segments

    def rate_at(self, t: np.ndarray) -> np.ndarray:
        """Offered rate at each time in ``t`` (seconds), never negative."""
        t = np.asarray(t, dtype=float)
        rate = np.full_like(t, self.rps)
        for i, segment in enumerate(self.segments):
            if isinstance(segment, Ramp):
                before = RateSchedule(rps=self.rps, segments=self.segments[:i])
                start_rate = float(before.rate_at(np.array([segment.start_s]))[0])
                rate = segment.apply(t, rate, start_rate)
            else:
                rate = segment.apply(t, rate)
        return np.maximum(rate, 0.0)

    def mean_rate(self, start_s: float, end_s: float) -> float:
        """Average offered rate over an interval (what load_factor is computed from)."""
        if end_s <= start_s:
            return float(self.rate_at(np.array([start_s]))[0])
        grid = np.linspace(start_s, end_s, 2001)
        return float(np.trapezoid(self.rate_at(grid), grid) / (end_s - start_s))

    def scaled(self, factor: float) -> RateSchedule:
        """The same shape at ``factor`` times the rate: what one share of a fleet behind a random split sees."""
        segments = tuple(
            segment.model_copy(update={"rps": segment.rps * factor})
            if isinstance(segment, Step)
            else segment.model_copy(update={"to_rps": segment.to_rps * factor})
            if isinstance(segment, Ramp)
            else segment  # spikes and the diurnal swing multiply the rate: unchanged
            for segment in self.segments
        )
        return RateSchedule(rps=self.rps * factor, segments=segments)

    def peak_rate(self, start_s: float, end_s: float) -> float:
        grid = np.linspace(start_s, end_s, 4001)
        return float(self.rate_at(grid).max())
