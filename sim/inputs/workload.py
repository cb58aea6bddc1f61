"""The offered load: when requests arrive, from which tier, and how many tokens each carries.

Arrivals follow a rate schedule (Poisson or constant), or replay a trace, or come from a
dataset file whose rows have timestamps. Token lengths come, when the model needs them
(continuous batching, step coefficients) or the workload names them, from
``prompt_tokens``/``output_tokens`` (a number or a distribution, :mod:`.lengths`) or from
a dataset's rows. The same workload drives ``simulate``, ``capacity`` and ``loadtest``,
so a prediction and a measurement see the same requests.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from ...core.model import ServiceModel, TokenShape
from .arrivals import ArrivalProcess, Arrivals, arrival_chunks, concatenate, generate_arrivals, load_trace, split
from .dataset import Dataset, load_dataset
from .lengths import LengthDist
from .schedule import RateSchedule

__all__ = ["DEFAULT_OUTPUT", "DEFAULT_PROMPT", "Workload"]

# Lengths when the model needs tokens and the workload names none: a chat-sized request.
DEFAULT_PROMPT = LengthDist(kind="fixed", value=512)
DEFAULT_OUTPUT = LengthDist(kind="fixed", value=128)


@functools.lru_cache(maxsize=4)
def _cached_dataset(path: Path, tokenizer: str | None) -> Dataset:
    return load_dataset(path, tokenizer)  # a workload asks for it several times per run (shape, arrivals, report)


class Workload(BaseModel):
    """The offered load (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: RateSchedule
    arrival: ArrivalProcess = ArrivalProcess.POISSON
    trace: Path | None = None
    prompt_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    dataset: Path | None = None
    tokenizer: str | None = None  # counts a ShareGPT dataset's tokens; without one they are estimated
    stream: bool = False  # streamed requests: a static batch answers each at its last token
    tokens: bool = False  # the requests carry lengths whatever the model (a load test of a token API)

    @field_validator("prompt_tokens", "output_tokens", mode="before")
    @classmethod
    def _parse_lengths(cls, value: Any) -> Any:
        return LengthDist.parse(str(value)) if isinstance(value, str | int | float) else value

    @classmethod
    def constant(cls, rps: float, arrival: ArrivalProcess = ArrivalProcess.POISSON) -> Workload:
        return cls(schedule=RateSchedule(rps=rps), arrival=arrival)

    def at_rate(self, rps: float) -> Workload:
        """The same workload at another base rate (a search or a sweep tries many)."""
        return self.model_copy(update={"schedule": self.schedule.model_copy(update={"rps": rps})})

    @property
    def is_replay(self) -> bool:
        """Arrivals come from a file (a trace, or a dataset with timestamps), not from the schedule."""
        return self.trace is not None or (self.dataset is not None and self._dataset().times is not None)

    def wants_tokens(self, model: ServiceModel) -> bool:
        return (
            self.tokens
            or model.tokens_modelled
            or self.dataset is not None
            or self.prompt_tokens is not None
            or (self.output_tokens is not None)
        )

    def _dataset(self) -> Dataset:
        assert self.dataset is not None
        return _cached_dataset(self.dataset, self.tokenizer)

    def arrivals(self, model: ServiceModel, horizon_s: float, seed: int) -> Arrivals:
        """The requests of one run, all at once (a load test's plan): times, tiers, lengths when tokens are in play."""
        return concatenate(self._with_lengths(model, self._times(model, horizon_s, seed, chunked=False), seed))

    def arrival_chunks(self, model: ServiceModel, horizon_s: float, seed: int) -> Iterator[Arrivals]:
        """The requests a time slice at a time: a streaming simulation never holds them all. Rate-driven
        arrivals are other draws than :meth:`arrivals`' for the same seed (the same process)."""
        return self._with_lengths(model, self._times(model, horizon_s, seed, chunked=True), seed)

    def _times(self, model: ServiceModel, horizon_s: float, seed: int, *, chunked: bool) -> Iterator[Arrivals]:
        data = self._dataset() if self.dataset is not None else None
        if data is not None and data.times is not None:
            assert data.tiers is not None
            whole = Arrivals(data.times, data.tiers, data.prompt_tokens, data.output_tokens)
        elif self.trace is not None:
            whole = load_trace(self.trace)
        elif chunked:
            rng = np.random.default_rng(seed)
            return arrival_chunks(self.schedule, horizon_s, model.tier_shares, rng, self.arrival)
        else:
            rng = np.random.default_rng(seed)
            whole = generate_arrivals(self.schedule, horizon_s, model.tier_shares, rng, self.arrival)
        return split(whole, 1.0) if chunked else iter([whole])

    def _with_lengths(self, model: ServiceModel, chunks: Iterator[Arrivals], seed: int) -> Iterator[Arrivals]:
        """Each chunk with its requests' token lengths when tokens are in play (a timed dataset has its own)."""
        data = self._dataset() if self.dataset is not None else None
        if (data is not None and data.times is not None) or not self.wants_tokens(model):
            yield from chunks
            return
        rng = np.random.default_rng([seed, 1])  # its own stream: the arrivals stay those of a run without tokens
        prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
        for arrivals in chunks:
            n = len(arrivals)
            if data is not None:  # lengths of the dataset's rows, drawn with replacement
                rows = rng.integers(0, len(data), size=n)
                yield arrivals.with_lengths(data.prompt_tokens[rows], data.output_tokens[rows])
            else:
                yield arrivals.with_lengths(prompt.sample(n, rng), output.sample(n, rng))

    def shape(self, model: ServiceModel) -> TokenShape | None:
        """Mean lengths for the back-of-envelope arithmetic (None when tokens are not in play)."""
        if not self.wants_tokens(model):
            return None
        if self.dataset is not None:
            data = self._dataset()
            return TokenShape(float(data.prompt_tokens.mean()), float(data.output_tokens.mean()))
        prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
        return TokenShape(prompt.mean_tokens, output.mean_tokens)

    def describe_lengths(self) -> str:
        """Where the token lengths come from, for the report."""
        if self.dataset is not None:
            return f"dataset {self.dataset.name} ({self._dataset().counted_with})"
        prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
        defaults = " (defaults)" if self.prompt_tokens is None and self.output_tokens is None else ""
        return f"prompt {prompt}, output {output} tokens{defaults}"
