"""Arrival processes: when requests arrive and from which tier, as numpy arrays.

Every process produces an :class:`Arrivals` (sorted times in seconds and a tier code per
request), so the engine never cares where the load came from. Poisson and constant
arrivals follow a :class:`~infer_plan.sim.inputs.schedule.RateSchedule` through the time-change
method: points of a unit-rate process are mapped through the inverse of the
cumulative rate, which handles steps, ramps, spikes and diurnal curves alike without
thinning loops. Traces are replayed from CSV or JSONL files.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

import numpy as np

from ...core.errors import ConfigError
from ...core.tiers import Tier
from .rows import json_rows, row_tier, row_timestamp
from .schedule import RateSchedule

__all__ = [
    "ArrivalProcess",
    "Arrivals",
    "arrival_chunks",
    "chunk_seconds",
    "concatenate",
    "generate_arrivals",
    "load_trace",
    "split",
]


class ArrivalProcess(StrEnum):
    POISSON = "poisson"
    CONSTANT = "constant"


@dataclass(frozen=True, slots=True)
class Arrivals:
    """Request-level input of a simulation: parallel arrays, sorted by time."""

    times: np.ndarray  # float64 seconds since the start
    tiers: np.ndarray  # int8 Tier values
    prompt_tokens: np.ndarray | None = None  # int32 per request, when tokens are modelled
    output_tokens: np.ndarray | None = None
    prefixes: np.ndarray | None = None  # object: what each prompt shares (core.prompt_blocks), when a workload says
    # Sessions (sim/inputs/sessions.py): the row of the turn each request follows (-1: a session's first, sent at
    # its time), and how long after that turn's last token it is sent. A later turn's time is NaN: the simulation
    # decides it. Rows: the first turns in time order, then the later ones.
    follows: np.ndarray | None = None
    think_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        for column in (self.tiers, self.prompt_tokens, self.output_tokens, self.prefixes, self.follows, self.think_s):
            if column is not None and column.shape != self.times.shape:
                raise ValueError("every column of Arrivals must have one entry per arrival")
        if (self.prompt_tokens is None) != (self.output_tokens is None):
            raise ValueError("prompt and output lengths come together")
        if (self.follows is None) != (self.think_s is None):
            raise ValueError("a session's turns and think times come together")

    @property
    def has_tokens(self) -> bool:
        return self.output_tokens is not None

    @property
    def has_sessions(self) -> bool:
        return self.follows is not None

    def with_lengths(
        self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, prefixes: np.ndarray | None = None
    ) -> Arrivals:
        return Arrivals(
            self.times, self.tiers, prompt_tokens.astype(np.int32), output_tokens.astype(np.int32), prefixes,
            self.follows, self.think_s,
        )  # fmt: skip

    def __len__(self) -> int:
        return int(self.times.size)

    def slice(self, lo: int, hi: int) -> Arrivals:
        if self.has_sessions:
            raise ValueError("a session's turns refer to each other by row: its arrivals are simulated whole")
        cut = slice(lo, hi)
        lengths = (self.prompt_tokens[cut], self.output_tokens[cut]) if self.has_tokens else (None, None)  # type: ignore[index]
        prefixes = None if self.prefixes is None else self.prefixes[cut]
        return Arrivals(self.times[cut], self.tiers[cut], *lengths, prefixes)

    @property
    def end_s(self) -> float:
        """The last time known before a run (a session's later turns are sent when the run says)."""
        if self.has_sessions:
            return float(np.nanmax(self.times)) if self.times.size else 0.0
        return float(self.times[-1]) if self.times.size else 0.0


def _cumulative_rate(schedule: RateSchedule, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    steps = max(2, min(200_001, int(horizon_s / 0.01) + 1))
    grid = np.linspace(0.0, horizon_s, steps)
    rate = schedule.rate_at(grid)
    cum = np.concatenate(([0.0], np.cumsum((rate[1:] + rate[:-1]) * 0.5 * np.diff(grid))))
    return grid, cum


# About this many requests per chunk: a few tens of MB of columns, whatever the rate.
_CHUNK_REQUESTS = 1 << 18


def chunk_seconds(schedule: RateSchedule, horizon_s: float) -> float:
    """The length of one chunk of arrivals: a second, shorter where the peak rate would make it large."""
    peak = schedule.rps if schedule.is_constant else schedule.peak_rate(0.0, horizon_s)
    return float(min(1.0, max(0.01, _CHUNK_REQUESTS / peak))) if peak > 0 else 1.0


def arrival_chunks(
    schedule: RateSchedule,
    horizon_s: float,
    tier_shares: tuple[float, ...],
    rng: np.random.Generator,
    process: ArrivalProcess = ArrivalProcess.POISSON,
) -> Iterator[Arrivals]:
    """Arrivals in ``[0, horizon_s)`` following ``schedule``, one time slice after another.

    A streaming simulation draws its requests a chunk at a time, so a million requests a
    second never exist at once; to compare it with an exact run, concatenate the same
    chunks (:func:`concatenate`).
    """
    if horizon_s <= 0:
        raise ValueError("horizon must be > 0")
    step = chunk_seconds(schedule, horizon_s)
    curve = None if schedule.is_constant else _cumulative_rate(schedule, horizon_s)
    edges = np.append(np.arange(0.0, horizon_s, step), horizon_s)
    for a, b in itertools.pairwise(edges.tolist()):
        yield _draw_between(schedule, a, b, curve, tier_shares, rng, process)


def _draw_between(
    schedule: RateSchedule,
    a: float,
    b: float,
    curve: tuple[np.ndarray, np.ndarray] | None,
    tier_shares: tuple[float, ...],
    rng: np.random.Generator,
    process: ArrivalProcess,
) -> Arrivals:
    """The arrivals in ``[a, b)``: drawn in unit time (expected arrivals), mapped back through the cumulative rate.

    ``curve`` is the cumulative rate's (grid, cumulative) table, None for a constant rate.
    """
    if curve is None:  # constant rate: unit time is rate x seconds
        lo, hi = schedule.rps * a, schedule.rps * b
    else:
        lo, hi = (float(x) for x in np.interp([a, b], curve[0], curve[1]))
    if process is ArrivalProcess.POISSON:
        unit = np.sort(rng.uniform(lo, hi, int(rng.poisson(hi - lo))))
    else:  # one request at the middle of each unit of expected arrivals
        unit = np.arange(math.ceil(lo - 0.5), math.ceil(hi - 0.5)) + 0.5
    # Through the inverse of the cumulative rate; it is non-decreasing, and flat stretches (rate 0) map to
    # their start, which is right.
    times = unit / schedule.rps if curve is None else np.interp(unit, curve[1], curve[0])
    times = np.clip(times, a, np.nextafter(b, a))  # float rounding never moves a request out of its slice
    tiers = rng.choice(len(tier_shares), size=times.size, p=np.asarray(tier_shares)).astype(np.int8)
    return Arrivals(times=times.astype(np.float64), tiers=tiers)


def concatenate(chunks: Iterable[Arrivals]) -> Arrivals:
    """One Arrivals of several in time order (an exact run's whole load)."""
    parts = list(chunks)
    if not parts:
        return Arrivals(np.empty(0), np.empty(0, np.int8))

    def column(name: str) -> np.ndarray | None:
        cols = [getattr(p, name) for p in parts]
        return None if cols[0] is None else np.concatenate(cols)

    if len(parts) == 1:
        return parts[0]
    if any(p.has_sessions for p in parts):
        raise ValueError("a session's turns refer to each other by row: its arrivals come in one piece")
    return Arrivals(*(column(name) for name in ("times", "tiers", "prompt_tokens", "output_tokens", "prefixes")))


def generate_arrivals(
    schedule: RateSchedule,
    horizon_s: float,
    tier_shares: tuple[float, ...],
    rng: np.random.Generator,
    process: ArrivalProcess = ArrivalProcess.POISSON,
) -> Arrivals:
    """Arrivals in ``[0, horizon_s)`` following ``schedule``, tiers drawn by ``tier_shares``, all at once.

    A load test's plan and the tests' fixed arrival sets: one draw over the whole horizon,
    where a streaming simulation draws a slice at a time (:func:`arrival_chunks`: the same
    process, other draws for a seed).
    """
    if horizon_s <= 0:
        raise ValueError("horizon must be > 0")
    curve = None if schedule.is_constant else _cumulative_rate(schedule, horizon_s)
    return _draw_between(schedule, 0.0, horizon_s, curve, tier_shares, rng, process)


def split(arrivals: Arrivals, step_s: float) -> Iterator[Arrivals]:
    """Arrivals held in memory (a trace, a dataset) handed out in time slices like generated ones."""
    if len(arrivals) == 0:
        return
    if arrivals.has_sessions:  # turns refer to each other by row: one piece
        yield arrivals
        return
    edges = np.arange(0.0, arrivals.end_s + step_s, step_s)
    bounds = np.searchsorted(arrivals.times, edges[1:], side="left")
    lo = 0
    for hi in [*bounds.tolist(), len(arrivals)]:
        if hi > lo:
            yield arrivals.slice(lo, hi)
            lo = hi


def load_trace(path: Path, default_tier: Tier = Tier.FREE) -> Arrivals:
    """Replay a trace: CSV or JSONL rows of a timestamp in seconds and an optional tier.

    CSV with a header names its columns ``timestamp`` (or ``t``) and ``tier``; CSV without
    one has the seconds in the first column and the tier, if any, in the second. JSONL
    rows are objects with the same keys. Timestamps may be epoch or relative; they are
    shifted so the first is 0. A row without a tier is ``default_tier``.
    """
    if not path.is_file():
        raise ConfigError(f"trace file not found: {path}")
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            if path.suffix.lower() in {".jsonl", ".ndjson"}:
                example = '{"timestamp": 1.5, "tier": "paid"}'
                rows = [
                    _trace_row(row.get("timestamp", row.get("t")), row.get("tier"), default_tier, path, n)
                    for n, row in json_rows(fh, path, example)
                ]
            else:
                rows = _csv_rows(fh, default_tier, path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text trace ({err})") from err
    if not rows:
        raise ConfigError(f"{path}: the trace holds no requests")
    data = np.array(rows, dtype=np.float64)
    order = np.argsort(data[:, 0], kind="stable")
    times = data[order, 0] - data[order[0], 0]
    return Arrivals(times=times, tiers=data[order, 1].astype(np.int8))


def _csv_rows(fh: TextIO, default_tier: Tier, path: Path) -> list[tuple[float, int]]:
    try:
        lines = [(n, row) for n, row in enumerate(csv.reader(fh), 1) if row and any(cell.strip() for cell in row)]
    except csv.Error as err:
        raise ConfigError(f"{path}: not a readable CSV trace ({err})") from err
    if not lines:
        return []
    first = [cell.strip().lower() for cell in lines[0][1]]
    if _is_number(first[0]):  # no header: seconds, then an optional tier
        return [_trace_row(row[0], row[1] if len(row) > 1 else None, default_tier, path, n) for n, row in lines]
    stamp = next((i for i, name in enumerate(first) if name in ("timestamp", "t")), None)
    if stamp is None:
        raise ConfigError(
            f"{path}:1: expected seconds in the first column, or a header naming a 'timestamp' column, "
            f"got {lines[0][1][0]!r}"
        )
    tier = first.index("tier") if "tier" in first else None
    return [
        _trace_row(_cell(row, stamp), _cell(row, tier) if tier is not None else None, default_tier, path, n)
        for n, row in lines[1:]
    ]


def _cell(row: list[str], i: int) -> str | None:
    return row[i] if i < len(row) else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _trace_row(raw: object, tier_name: object, default_tier: Tier, path: Path, lineno: int) -> tuple[float, int]:
    stamp = row_timestamp(raw, path, lineno)
    if stamp is None:
        raise ConfigError(f"{path}:{lineno}: expected a timestamp in seconds, got {raw!r}")
    return stamp, row_tier(tier_name, default_tier, path, lineno)
