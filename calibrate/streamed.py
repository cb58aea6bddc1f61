"""Calibrating a continuous engine the way it runs: streamed requests, timed token by token (SPEC section 12).

A continuous engine never runs a "batch": sequences join and leave between steps, and
each request also costs time outside the steps (HTTP, tokenisation, scheduling). Timing
static batches (a list of prompts in one request) measures neither, so the continuous
model is fitted to three kinds of streamed measurement, each through the backend's own
``run_batch`` with a token sink that stamps every token's arrival:

- ``decode``: ``N`` requests started together with long answers; once all of them
  decode, each gap between tokens is one step of N sequences:
  ``decode_step + per_seq x N``.
- ``mixed``: ``N`` requests decode while a newcomer with a ``P``-token prompt arrives;
  the gap of the decoders across the newcomer's first token is the step that prefilled
  it: ``decode_step + per_seq x (N + 1) + prefill_per_token x P``.
- ``lone``: one request at a time on the idle engine; its time to first token is the
  overheads plus one prefill step: ``overhead + tokenize x P + step(P, 1)``.

The step and overhead terms are fitted to all cells at once (non-negative least
squares, each cell weighed by its relative error): the gaps pin the step, and the lone
TTFTs what the step does not explain, ``overhead + tokenize x P``. A per
streamed-token cost (``output_token_ms``) cannot be told apart from the step's fixed
cost by a client, so it stays inside ``decode_step_ms`` (what the client sees as a gap,
and conservative for throughput). Cells are medians over repetitions, and a gap is
read where the engine is in the state the cell names, so a stray slow step (or a token
whose text was held back, merging two gaps) moves no fitted term.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.schema import StreamCell
from ..server.backends.base import Backend, BackendError, Generate, Generated
from .measure import PROMPT_IDS

__all__ = ["ContinuousFit", "StreamPlan", "StreamTimings", "fit_continuous", "measure_streams", "nnls_relative"]

LONE_OUTPUT = 2  # a first token and one gap; a last token may come as the end marker, uncounted
WARMUP_REQUESTS = 3


@dataclass(frozen=True)
class StreamPlan:
    """What to measure: prompt lengths (lone and mixed cells), concurrencies (decode cells), the decoders' length."""

    prompts: list[int]
    concurrencies: list[int]
    output_tokens: int  # each decoding request's answer: long enough to outlast a newcomer's prefill
    repetitions: int


@dataclass
class _Stamps:
    """A token sink that keeps each token's arrival time; ``reached(k)`` fires once k tokens have come."""

    times: list[float] = field(default_factory=list)
    cancelled: bool = False
    output: Generated | None = None
    _waits: dict[int, asyncio.Event] = field(default_factory=dict)

    def token(self, piece: str) -> None:
        self.times.append(time.perf_counter())
        if (event := self._waits.get(len(self.times))) is not None:
            event.set()

    def finish(self, output: Generated) -> None:
        self.output = output

    async def reached(self, k: int) -> None:
        if len(self.times) < k:
            await self._waits.setdefault(k, asyncio.Event()).wait()


@dataclass
class StreamTimings:
    """Every cell's samples (ms), keyed by (kind, sequences, prefill tokens)."""

    samples_ms: dict[tuple[str, int, int], list[float]] = field(default_factory=dict)

    def add(self, kind: str, sequences: int, prefill: int, value_ms: float | None) -> None:
        if value_ms is not None and np.isfinite(value_ms):
            self.samples_ms.setdefault((kind, sequences, prefill), []).append(value_ms)


class _Prober:
    """Sends exact-length, never-repeating prompts through ``backend`` and stamps their tokens."""

    def __init__(self, backend: Backend, seed: int) -> None:
        self.backend = backend
        self.rng = random.Random(seed)

    async def stream(self, prompt: int, output: int, sink: _Stamps | None = None) -> tuple[float, _Stamps]:
        """One request of ``prompt`` tokens asking exactly ``output``: (when it was sent, its token stamps)."""
        sink = sink or _Stamps()
        ids = self.rng.choices(PROMPT_IDS, k=prompt)  # random ids: no prefix cache can skip the prefill
        sent = time.perf_counter()
        await self.backend.run_batch([Generate(ids, output, ignore_eos=True, sink=sink)], 0)
        if len(sink.times) < 1:
            raise BackendError("the engine streamed no token: is it an engine that streams (a continuous one)?")
        return sent, sink


async def measure_streams(
    backend: Backend, plan: StreamPlan, *, seed: int = 0, on_probe: Callable[[], None] | None = None
) -> StreamTimings:
    """Every cell of ``plan``, ``plan.repetitions`` times, cells shuffled on each repetition (slow drift is no size)."""
    prober, timings = _Prober(backend, seed), StreamTimings()
    for _ in range(WARMUP_REQUESTS):
        await prober.stream(max(plan.prompts), LONE_OUTPUT)
    cells = [("lone", p) for p in plan.prompts] + [("decode", n) for n in plan.concurrencies]
    cells += [("mixed", p) for p in plan.prompts]
    decoders = max(1, max(plan.concurrencies) - 1)  # the newcomer takes the last slot
    shortest = min(plan.prompts)
    for _ in range(plan.repetitions):
        prober.rng.shuffle(cells)
        for kind, x in cells:
            if kind == "lone":
                sent, sink = await prober.stream(x, LONE_OUTPUT)
                timings.add("lone", 1, x, (sink.times[0] - sent) * 1000.0)
            elif kind == "decode":
                streams = await asyncio.gather(*(prober.stream(shortest, plan.output_tokens) for _ in range(x)))
                timings.add("decode", x, 0, _steady_gap_ms([s.times for _, s in streams]))
            else:
                timings.add("mixed", decoders + 1, x, await _mixed_gap_ms(prober, decoders, x, shortest, plan))
            if on_probe:
                on_probe()
    return timings


def _steady_gap_ms(streams: list[list[float]]) -> float | None:
    """The median gap while every stream decodes: after the last first token, before the first stream ends."""
    start, end = max(t[0] for t in streams), min(t[-1] for t in streams)
    gaps = [b - a for t in streams for a, b in itertools.pairwise(t) if a >= start and b <= end]
    return float(np.median(gaps)) * 1000.0 if gaps else None


async def _mixed_gap_ms(prober: _Prober, decoders: int, prompt: int, shortest: int, plan: StreamPlan) -> float | None:
    """The decoders' gap across the step that prefilled a newcomer: the gap ending nearest its first token."""
    sinks = [_Stamps() for _ in range(decoders)]
    background = [asyncio.ensure_future(prober.stream(shortest, plan.output_tokens, s)) for s in sinks]
    decoding = asyncio.ensure_future(asyncio.gather(*(s.reached(3) for s in sinks)))  # none prefilling any more
    try:
        await asyncio.wait([decoding, *background], return_when=asyncio.FIRST_COMPLETED)
        if not decoding.done():  # a decoder ended first (an engine that stops early): no mixed step to see
            return None
        _, newcomer = await prober.stream(prompt, LONE_OUTPUT)  # its first token is then never the last
    finally:
        decoding.cancel()
        await asyncio.gather(*background)
    first = newcomer.times[0]
    gaps = []
    for s in sinks:
        k = int(np.argmin([abs(t - first) for t in s.times]))
        if 0 < k < len(s.times) - 1 or (k == len(s.times) - 1 and s.times[k] >= first):
            gaps.append(s.times[k] - s.times[k - 1])
    return float(np.median(gaps)) * 1000.0 if gaps else None


@dataclass(frozen=True)
class ContinuousFit:
    """The continuous model's step and overhead terms fitted to streamed cells, with each cell's fit."""

    decode_step_ms: float
    decode_ms_per_seq: float
    prefill_ms_per_token: float
    request_overhead_ms: float
    tokenize_ms_per_token: float
    cells: list[StreamCell]

    @property
    def max_relative_error(self) -> float:
        return max((_rel(c) for c in self.cells), default=0.0)

    @property
    def mean_relative_error(self) -> float:
        return float(np.mean([_rel(c) for c in self.cells])) if self.cells else 0.0

    def terms(self) -> dict[str, float]:
        """The service-model fields the fit sets (a streamed-token cost stays inside the step: module docstring)."""
        return {
            "decode_step_ms": self.decode_step_ms, "decode_ms_per_seq": self.decode_ms_per_seq,
            "prefill_ms_per_token": self.prefill_ms_per_token, "request_overhead_ms": self.request_overhead_ms,
            "tokenize_ms_per_token": self.tokenize_ms_per_token, "output_token_ms": 0.0,
        }  # fmt: skip

    def step_ms(self, prefill: float, sequences: float) -> float:
        return self.decode_step_ms + self.decode_ms_per_seq * sequences + self.prefill_ms_per_token * prefill


def _rel(cell: StreamCell) -> float:
    return abs(cell.fitted_ms - cell.median_ms) / cell.median_ms if cell.median_ms > 0 else 0.0


def nnls_relative(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares, each row weighed by 1 / y (relative error), so small cells count as much."""
    from scipy.optimize import nnls  # loads on use

    weights = 1.0 / np.maximum(y, 1e-9)
    coefficients, _ = nnls(design * weights[:, None], y * weights)
    return coefficients


def fit_continuous(timings: StreamTimings) -> ContinuousFit:
    """All five terms at once, to every cell's median (module docstring).

    A gap is one step: ``[1, N, P, 0, 0]``; a lone TTFT is one step of one sequence plus
    the overheads: ``[1, 1, P, 1, P]``. One joint non-negative fit, each cell weighed by
    its relative error, spreads the misfit over the cells instead of pushing all of the
    step's error into the overheads.
    """
    medians = {key: float(np.median(v)) for key, v in timings.samples_ms.items() if v}
    kinds = {key[0] for key in medians}
    concurrencies = {n for kind, n, _ in medians if kind == "decode"}
    lone_prompts = {p for kind, _, p in medians if kind == "lone"}
    if len(concurrencies) < 2 or "mixed" not in kinds or len(lone_prompts) < 2:
        seen = ", ".join(f"{k}/{n}/{p}" for k, n, p in medians) or "none"
        raise BackendError(
            "too few streamed cells to fit the continuous model (needs decode gaps at two concurrencies, a mixed "
            f"step and lone requests at two prompt lengths; measured kind/sequences/prefill: {seen})"
        )
    keys = list(medians)
    lone = np.array([kind == "lone" for kind, _, _ in keys], dtype=float)
    n = np.array([key[1] for key in keys], dtype=float)
    p = np.array([key[2] for key in keys], dtype=float)
    y = np.array([medians[key] for key in keys])
    design = np.column_stack([np.ones_like(n), n, p, lone, lone * p])
    terms = nnls_relative(design, y)
    a, b, c, alpha0, alpha1 = (float(x) for x in terms)
    cells = [
        StreamCell(kind=kind, sequences=seqs, prefill_tokens=prefill, samples=len(timings.samples_ms[key]),
                   median_ms=medians[key], p95_ms=float(np.percentile(timings.samples_ms[key], 95)),
                   fitted_ms=float(fitted))
        for key, fitted in zip(keys, design @ terms, strict=True)
        for kind, seqs, prefill in [key]
    ]  # fmt: skip
    order = {"lone": 0, "decode": 1, "mixed": 2}
    cells.sort(key=lambda cell: (order[cell.kind], cell.sequences, cell.prefill_tokens))
    return ContinuousFit(a, b, c, alpha0, alpha1, cells)
