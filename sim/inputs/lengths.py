"""Token lengths of requests: a fixed number, or a distribution written as a short string.

``--prompt-tokens`` and ``--output-tokens`` (on ``simulate``, ``capacity`` and
``loadtest`` alike) take:

- ``512``: every request the same;
- ``uniform:64,1024``: integers uniform in [64, 1024];
- ``lognormal:mean=512,sd=256``: a log-normal with that mean and standard deviation
  (of the lengths, not of their logarithm), the usual shape of chat prompts;
- ``normal:mean=512,sd=64`` and ``exponential:mean=200``.

Every sample is rounded and kept to at least one token (``max`` caps it, e.g. a
model's context).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...core.errors import UsageError

__all__ = ["LengthDist"]

Kind = Literal["fixed", "uniform", "lognormal", "normal", "exponential"]
_PARAMS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("mean", "sd"),
    "normal": ("mean", "sd"),
    "exponential": ("mean",),
}


class LengthDist(BaseModel):
    """A distribution of token counts (see the module docstring for the string forms)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = "fixed"
    value: float = Field(default=0.0, ge=0)
    low: float = Field(default=1.0, ge=0)
    high: float = Field(default=1.0, ge=0)
    mean: float = Field(default=1.0, gt=0)
    sd: float = Field(default=0.0, ge=0)
    max: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> LengthDist:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"uniform needs low <= high (got {self.low:g}, {self.high:g})")
        return self

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """``512``, ``uniform:64,1024``, ``lognormal:mean=512,sd=256``, ... (raises UsageError on anything else)."""
        text = text.strip()
        kind, sep, rest = text.partition(":")
        if not sep:
            return cls._number(text)
        kind = kind.strip().lower()
        if kind not in _PARAMS:
            valid = ", ".join(_PARAMS)
            raise UsageError(f"unknown length distribution {kind!r} in {text!r} (valid: a number, {valid})")
        names = _PARAMS[kind]
        values: dict[str, float] = {}
        for i, part in enumerate(p.strip() for p in rest.split(",")):
            name, eq, value = part.partition("=")
            key = name.strip() if eq else (names[i] if i < len(names) else "?")
            if key not in names:
                raise UsageError(f"{text!r}: {kind} takes {', '.join(names)}, not {key!r}")
            values[key] = _number(value if eq else part, text)
        if set(values) != set(names):
            raise UsageError(f"{text!r}: {kind} needs {', '.join(names)} (e.g. {_EXAMPLES[kind]})")
        try:
            return cls(kind=kind, **values)  # type: ignore[arg-type]
        except ValueError as err:
            raise UsageError(f"{text!r}: {_first_error(err)}") from None

    @classmethod
    def _number(cls, text: str) -> LengthDist:
        try:
            value = float(text)
        except ValueError:
            examples = ", ".join(_EXAMPLES.values())
            raise UsageError(f"{text!r} is neither a token count nor a distribution (e.g. 512, {examples})") from None
        value = _number(text, text)
        if value < 1:
            raise UsageError(f"a token count must be >= 1, got {text!r}")
        return cls(kind="fixed", value=value)

    @property
    def mean_tokens(self) -> float:
        """The mean length (before rounding and capping), for the back-of-envelope arithmetic."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        return self.mean

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lengths as int32, each >= 1 (and <= max when set)."""
        lengths = np.maximum(np.rint(self._raw(n, rng, whole=True)), 1)
        if self.max is not None:
            lengths = np.minimum(lengths, self.max)
        return lengths.astype(np.int32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` values as float64, >= 0, unrounded: the same distributions for a time (``--think-time``)."""
        values = np.maximum(self._raw(n, rng, whole=False), 0.0)
        return np.minimum(values, self.max) if self.max is not None else values

    def _raw(self, n: int, rng: np.random.Generator, *, whole: bool) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value)
        if self.kind == "uniform":
            if whole:
                return rng.integers(round(self.low), round(self.high) + 1, size=n)
            return rng.uniform(self.low, self.high, size=n)
        if self.kind == "lognormal":
            sigma2 = math.log1p((self.sd / self.mean) ** 2)
            return rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size=n)
        if self.kind == "normal":
            return rng.normal(self.mean, self.sd, size=n)
        return rng.exponential(self.mean, size=n)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        return f"{self.kind}:" + ",".join(f"{name}={getattr(self, name):g}" for name in _PARAMS[self.kind])


_EXAMPLES = {
    "fixed": "fixed:512",
    "uniform": "uniform:64,1024",
    "lognormal": "lognormal:mean=512,sd=256",
    "normal": "normal:mean=512,sd=64",
    "exponential": "exponential:mean=200",
}


def _number(value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise UsageError(f"{text!r}: {value.strip()!r} must be a finite number >= 0")
    return number


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}".removeprefix("Value error, ")
    return str(err)
