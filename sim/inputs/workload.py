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
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ...core.errors import UsageError
from ...core.model import Batching, ServiceModel, TokenShape
from ...core.prompt_blocks import TraceHashes
from .arrivals import ArrivalProcess, Arrivals, arrival_chunks, concatenate, generate_arrivals, load_trace, split
from .dataset import Dataset, TraceFormat, load_dataset
from .lengths import LengthDist
from .public_traces import repeated_prefix_share
from .schedule import RateSchedule
from .sessions import SessionSpec, parse_think_time
from .shared_prefix import SharedPrefixSpec

__all__ = ["DEFAULT_OUTPUT", "DEFAULT_PROMPT", "Workload"]

# Lengths when the model needs tokens and the workload names none: a chat-sized request.
DEFAULT_PROMPT = LengthDist(kind="fixed", value=512)
DEFAULT_OUTPUT = LengthDist(kind="fixed", value=128)


@functools.lru_cache(maxsize=4)
def _cached_dataset(path: Path, tokenizer: str | None, fmt: TraceFormat) -> Dataset:
    return load_dataset(path, tokenizer, fmt)  # a workload asks for it several times per run (shape, arrivals, report)


class Workload(BaseModel):
    """The offered load (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: RateSchedule
    arrival: ArrivalProcess = ArrivalProcess.POISSON
    trace: Path | None = None
    prompt_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    dataset: Path | None = None
    dataset_format: TraceFormat = TraceFormat.AUTO  # a public trace as published, or ours (sim/inputs/dataset.py)
    shared_prefix: SharedPrefixSpec | None = None  # each prompt starts with one of a few system prompts
    sessions: LengthDist | None = None  # turns per conversation; sessions start at the rate (sim/inputs/sessions.py)
    think_time: LengthDist | None = None  # seconds from a turn's last token to the next turn
    tokenizer: str | None = None  # counts a ShareGPT dataset's tokens; without one they are estimated
    stream: bool = False  # streamed requests: a static batch answers each at its last token
    tokens: bool = False  # the requests carry lengths whatever the model (a load test of a token API)

    @field_validator("prompt_tokens", "output_tokens", "sessions", mode="before")
    @classmethod
    def _parse_lengths(cls, value: Any) -> Any:
        return LengthDist.parse(str(value)) if isinstance(value, str | int | float) else value

    @field_validator("think_time", mode="before")
    @classmethod
    def _parse_think(cls, value: Any) -> Any:
        return parse_think_time(str(value)) if isinstance(value, str | int | float) else value

    @model_validator(mode="after")
    def _sessions_alone(self) -> Workload:
        if self.think_time is not None and self.sessions is None:
            raise UsageError("--think-time is the pause between a session's turns: give --sessions TURNS too",
                             field="think_time")  # fmt: skip
        if self.sessions is not None and (self.trace is not None or self.dataset is not None):
            raise UsageError("--sessions draws each turn's message from --prompt-tokens; a --trace or --dataset "
                             "brings its own requests", field="sessions")  # fmt: skip
        return self

    @property
    def session_spec(self) -> SessionSpec | None:
        if self.sessions is None:
            return None
        return SessionSpec(turns=self.sessions, **({"think_s": self.think_time} if self.think_time else {}))

    @property
    def requests_per_arrival(self) -> float:
        """Requests each arrival of the schedule brings: a session's mean turns, else one."""
        spec = self.session_spec
        return spec.mean_turns if spec is not None else 1.0

    @field_validator("shared_prefix", mode="before")
    @classmethod
    def _parse_shared_prefix(cls, value: Any) -> Any:
        return SharedPrefixSpec.parse(value) if isinstance(value, str) else value

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
            or self.shared_prefix is not None
            or self.sessions is not None
        )

    def _dataset(self) -> Dataset:
        assert self.dataset is not None
        return _cached_dataset(self.dataset, self.tokenizer, self.dataset_format)

    def arrivals(self, model: ServiceModel, horizon_s: float, seed: int) -> Arrivals:
        """The requests of one run, all at once (a load test's plan): times, tiers, lengths when tokens are in play."""
        return concatenate(self._with_lengths(model, self._times(model, horizon_s, seed, chunked=False), seed))

    def arrival_chunks(self, model: ServiceModel, horizon_s: float, seed: int) -> Iterator[Arrivals]:
        """The requests a time slice at a time: a streaming simulation never holds them all. Rate-driven
        arrivals are other draws than :meth:`arrivals`' for the same seed (the same process)."""
        return self._with_lengths(model, self._times(model, horizon_s, seed, chunked=True), seed)

    def _times(self, model: ServiceModel, horizon_s: float, seed: int, *, chunked: bool) -> Iterator[Arrivals]:
        if self.sessions is not None and model.batching is Batching.STATIC:
            raise UsageError("--sessions needs continuous batching (a turn waits for the answer before it; the "
                             "static batch cycle runs open-loop arrivals): --batching continuous",
                             field="sessions")  # fmt: skip
        chunked = chunked and self.sessions is None  # a session's turns refer to each other: one piece
        data = self._dataset() if self.dataset is not None else None
        if data is not None and data.times is not None:
            assert data.tiers is not None
            whole = Arrivals(data.times, data.tiers, data.prompt_tokens, data.output_tokens, _trace_prefixes(data))
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
        prefix_rng = np.random.default_rng([seed, 2])  # and the lengths those of a run without a shared prefix
        prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
        shared = self.shared_prefix
        if (spec := self.session_spec) is not None:
            yield spec.build(concatenate(chunks), prompt, output, shared, np.random.default_rng([seed, 3]), prefix_rng)
            return
        for arrivals in chunks:
            n = len(arrivals)
            if data is not None:  # lengths of the dataset's rows, drawn with replacement
                rows = rng.integers(0, len(data), size=n)
                lengths, prefixes = (data.prompt_tokens[rows], data.output_tokens[rows]), _trace_prefixes(data, rows)
            else:
                lengths, prefixes = (prompt.sample(n, rng), output.sample(n, rng)), None
            if shared is not None:  # the system prompt comes first, the request's own prompt after it
                lengths, prefixes = (lengths[0] + shared.tokens, lengths[1]), shared.draw(n, prefix_rng)
            yield arrivals.with_lengths(*lengths, prefixes)

    def shape(self, model: ServiceModel) -> TokenShape | None:
        """Mean lengths for the back-of-envelope arithmetic (None when tokens are not in play)."""
        if not self.wants_tokens(model):
            return None
        extra = self.shared_prefix.tokens if self.shared_prefix is not None else 0
        if self.dataset is not None:
            data = self._dataset()
            prompt_mean, output_mean = float(data.prompt_tokens.mean()) + extra, float(data.output_tokens.mean())
        else:
            prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
            prompt_mean, output_mean = prompt.mean_tokens + extra, output.mean_tokens
        history = 0.0  # a turn's mean history: turn t (from 0) repeats t messages and answers
        if (spec := self.session_spec) is not None:
            history = (spec.mean_turns - 1) / 2 * (prompt_mean - extra + output_mean)
        cached = self._expected_cached(model, prompt_mean + history, history)
        return TokenShape(prompt_mean + history, output_mean, cached)

    def _expected_cached(self, model: ServiceModel, prompt_mean: float, history: float = 0.0) -> float:
        """The arithmetic's guess of the prompt tokens a request finds cached, before any simulation: a shared
        system prompt's full blocks and a session's history (as if every one stayed cached), or the share of a
        trace's prompt tokens that repeat an earlier prefix. The simulation measures the real hit rate; its
        result uses that."""
        if not model.prefix_caching:
            return 0.0
        block = model.kv_block_tokens
        if self.shared_prefix is not None or history:
            system = self.shared_prefix.tokens // block * block if self.shared_prefix is not None else 0
            return float(min(system + max(0.0, history - block / 2), prompt_mean - 1))
        data = self._dataset() if self.dataset is not None else None
        if data is not None and data.block_ids is not None and data.block_tokens is not None:
            return prompt_mean * repeated_prefix_share(data.block_ids, data.prompt_tokens, data.block_tokens)
        return 0.0

    def describe_lengths(self) -> str:
        """Where the token lengths come from, for the report."""
        shared = self.shared_prefix
        after = f" after one of {shared.count} shared {shared.tokens}-token system prompts ({shared})" if shared else ""
        if self.dataset is not None:
            return f"dataset {self.dataset.name} ({self._dataset().counted_with}){after}"
        prompt, output = self.prompt_tokens or DEFAULT_PROMPT, self.output_tokens or DEFAULT_OUTPUT
        defaults = " (defaults)" if self.prompt_tokens is None and self.output_tokens is None else ""
        if (spec := self.session_spec) is not None:
            return (f"sessions of {spec.turns} turns, {spec.think_s} s apart: each a message of {prompt} tokens "
                    f"after the history{after}, answered in {output} tokens{defaults}")  # fmt: skip
        return f"prompt {prompt}{after}, output {output} tokens{defaults}"


def _trace_prefixes(data: Dataset, rows: np.ndarray | None = None) -> np.ndarray | None:
    """A trace's block hash ids as each request's prompt prefix (core.prompt_blocks); None when it has none."""
    if data.block_ids is None or data.block_tokens is None:
        return None
    picked = range(len(data)) if rows is None else rows.tolist()
    prefixes = np.empty(len(picked), dtype=object)
    prefixes[:] = [TraceHashes(tuple(data.block_ids[k].tolist()), data.block_tokens) for k in picked]
    return prefixes
