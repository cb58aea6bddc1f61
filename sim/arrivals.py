"""Arrival processes: when requests arrive and from which tier, as numpy arrays.

Every process produces an :class:`Arrivals` (sorted times in seconds and a tier code per
request), so the engine never cares where the load came from. Poisson and constant
arrivals follow a :class:`~infer_plan.sim.schedule.RateSchedule` through the time-change
method: points of a unit-rate process are mapped through the inverse of the
cumulative rate, which handles steps, ramps, spikes and diurnal curves alike without
thinning loops. Traces are replayed from CSV or JSONL files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

import numpy as np

from ..core.errors import ConfigError
from ..core.tiers import Tier
from .schedule import RateSchedule

__all__ = ["ArrivalProcess", "Arrivals", "generate_arrivals", "load_trace"]


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

    def __post_init__(self) -> None:
        for column in (self.tiers, self.prompt_tokens, self.output_tokens):
            if column is not None and column.shape != self.times.shape:
                raise ValueError("every column of Arrivals must have one entry per arrival")
        if (self.prompt_tokens is None) != (self.output_tokens is None):
            raise ValueError("prompt and output lengths come together")

    @property
    def has_tokens(self) -> bool:
        return self.output_tokens is not None

    def with_lengths(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> Arrivals:
        return Arrivals(self.times, self.tiers, prompt_tokens.astype(np.int32), output_tokens.astype(np.int32))

    def __len__(self) -> int:
        return int(self.times.size)

    @property
    def end_s(self) -> float:
        return float(self.times[-1]) if self.times.size else 0.0


def _cumulative_rate(schedule: RateSchedule, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
    steps = max(2, min(200_001, int(horizon_s / 0.01) + 1))
    grid = np.linspace(0.0, horizon_s, steps)
    rate = schedule.rate_at(grid)
    cum = np.concatenate(([0.0], np.cumsum((rate[1:] + rate[:-1]) * 0.5 * np.diff(grid))))
    return grid, cum


def generate_arrivals(
    schedule: RateSchedule,
    horizon_s: float,
    tier_shares: tuple[float, ...],
    rng: np.random.Generator,
    process: ArrivalProcess = ArrivalProcess.POISSON,
) -> Arrivals:
    """Arrivals in ``[0, horizon_s)`` following ``schedule``, tiers drawn by ``tier_shares``."""
    if horizon_s <= 0:
        raise ValueError("horizon must be > 0")
    if schedule.is_constant:
        expected = schedule.rps * horizon_s
        if process is ArrivalProcess.POISSON:
            count = int(rng.poisson(expected))
            times = np.sort(rng.uniform(0.0, horizon_s, count))
        else:
            times = (np.arange(int(expected)) + 0.5) / schedule.rps if schedule.rps > 0 else np.empty(0)
    else:
        grid, cum = _cumulative_rate(schedule, horizon_s)
        total = float(cum[-1])
        if process is ArrivalProcess.POISSON:
            unit = np.sort(rng.uniform(0.0, total, int(rng.poisson(total))))
        else:
            unit = np.arange(int(total)) + 0.5
        # cum is non-decreasing; flat stretches (rate 0) map to their start, which is right.
        times = np.interp(unit, cum, grid)
    tiers = rng.choice(len(tier_shares), size=times.size, p=np.asarray(tier_shares)).astype(np.int8)
    return Arrivals(times=times.astype(np.float64), tiers=tiers)


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
                rows = [_json_row(line, n, default_tier, path) for n, line in enumerate(fh, 1) if line.strip()]
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


def _json_row(line: str, lineno: int, default_tier: Tier, path: Path) -> tuple[float, int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError(f'{path}:{lineno}: expected an object like {{"timestamp": 1.5, "tier": "paid"}}')
    return _trace_row(record.get("timestamp", record.get("t")), record.get("tier"), default_tier, path, lineno)


def _cell(row: list[str], i: int) -> str | None:
    return row[i] if i < len(row) else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _trace_row(raw: object, tier_name: object, default_tier: Tier, path: Path, lineno: int) -> tuple[float, int]:
    try:
        stamp = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{path}:{lineno}: expected a timestamp in seconds, got {raw!r}") from None
    if not np.isfinite(stamp):
        raise ConfigError(f"{path}:{lineno}: expected a finite timestamp in seconds, got {raw!r}")
    try:
        tier = Tier.parse(str(tier_name)) if tier_name not in (None, "") else default_tier
    except ValueError as err:
        raise ConfigError(f"{path}:{lineno}: {err}") from None
    return stamp, int(tier)
