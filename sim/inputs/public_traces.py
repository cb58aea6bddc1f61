"""The public LLM traces, read as they are published (``shared/notes/traces.md``).

A user who downloads Mooncake's, Azure's or BurstGPT's trace points ``--dataset`` at the
file as it came: no conversion script to write, no column to rename. Each reader turns
its rows into arrival seconds and token lengths (and, for Mooncake and Bailian, the
prompt's block hash ids: equal ids are equal prefixes, which is what a prefix cache
reuses). Every bad row is one line naming the file and its line number.

Rows with 0 output tokens are dropped and counted in the dataset's description: BurstGPT
logs its failed requests that way (0 response tokens), and a request that produced
nothing says nothing about the service's work. Rows with 0 prompt tokens likewise.
Traces carry no tiers: every request is ``free``, as a trace row without a tier is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import ConfigError
from .rows import json_rows, row_number

__all__ = ["TraceFormat", "TraceRows", "detect_format", "read_public_trace"]


class TraceFormat(StrEnum):
    """A dataset file's format (``--dataset-format``); ``auto`` reads it from the file's first row."""

    AUTO = "auto"
    JSONL = "jsonl"  # ours: prompt_tokens / output_tokens [/ timestamp / tier]
    SHAREGPT = "sharegpt"
    MOONCAKE = "mooncake"  # JSONL: timestamp (ms), input_length, output_length, hash_ids of 512-token blocks
    BAILIAN = "bailian"  # as Mooncake, 16-token blocks
    AZURE = "azure"  # CSV: TIMESTAMP (date-time), ContextTokens, GeneratedTokens
    BURSTGPT = "burstgpt"  # CSV: Timestamp (s), Model, Request tokens, Response tokens, Total tokens, Log Type
    VIDUR = "vidur"  # CSV: arrived_at (s), num_prefill_tokens, num_decode_tokens (Vidur's processed traces)


# The block size each hash-id trace was published with (one id per block of the prompt).
BLOCK_TOKENS = {TraceFormat.MOONCAKE: 512, TraceFormat.BAILIAN: 16}
# CSV formats: (time column, prompt column, output column), as each trace's header spells them.
CSV_COLUMNS = {
    TraceFormat.AZURE: ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    TraceFormat.BURSTGPT: ("Timestamp", "Request tokens", "Response tokens"),
    TraceFormat.VIDUR: ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
}


@dataclass(frozen=True)
class TraceRows:
    """A public trace's requests in file order (sorting and shifting to 0 is the dataset's job)."""

    times_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int32
    output_tokens: np.ndarray  # int32
    block_ids: list[np.ndarray] | None  # per request, its prompt's block hash ids (Mooncake, Bailian)
    block_tokens: int | None
    dropped: int  # rows with 0 prompt or 0 output tokens

    def describe(self, fmt: TraceFormat) -> str:
        """How the lengths were obtained, with what a prefix cache could reuse, for the report."""
        parts = [f"{fmt.value} trace's token counts"]
        if self.dropped:
            parts.append(f"{self.dropped} rows with 0 prompt or output tokens dropped")
        if self.block_ids is not None and self.block_tokens is not None:
            share = repeated_prefix_share(self.block_ids, self.prompt_tokens, self.block_tokens)
            parts.append(f"{share:.0%} of prompt tokens repeat an earlier prefix ({self.block_tokens}-token blocks)")
        return "; ".join(parts)


def detect_format(path: Path, text: str) -> TraceFormat:
    """The format of ``text`` from its first row: JSON list, JSON lines by their keys, or CSV by its header."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return TraceFormat.SHAREGPT
    first = stripped.split("\n", 1)[0].strip()
    if first.startswith("{"):
        return _hash_id_format(first) if '"input_length"' in first else TraceFormat.JSONL
    header = {cell.strip() for cell in next(csv.reader([first]), [])}
    for fmt, columns in CSV_COLUMNS.items():
        if set(columns) <= header:
            return fmt
    known = "; ".join(f"{fmt.value}: {', '.join(cols)}" for fmt, cols in CSV_COLUMNS.items())
    raise ConfigError(
        f"{path}: not a dataset format infer-plan knows (first line {first[:80]!r}); CSV headers it reads: {known}; "
        "JSON lines of prompt_tokens/output_tokens or Mooncake's input_length/output_length; ShareGPT JSON"
    )


def _hash_id_format(first: str) -> TraceFormat:
    """Mooncake or Bailian (the same keys): more ids than 512-token blocks could cover means 16-token blocks."""
    try:
        row = json.loads(first)
        ids, prompt = len(row["hash_ids"]), int(row["input_length"])
    except (ValueError, KeyError, TypeError):
        return TraceFormat.MOONCAKE  # the reader names the bad row
    return TraceFormat.BAILIAN if ids > math.ceil(prompt / BLOCK_TOKENS[TraceFormat.MOONCAKE]) else TraceFormat.MOONCAKE


def read_public_trace(path: Path, text: str, fmt: TraceFormat) -> TraceRows:
    """Read a Mooncake/Bailian, Azure, BurstGPT or Vidur trace (see the module docstring)."""
    if fmt in BLOCK_TOKENS:
        return _hash_id_rows(path, text, BLOCK_TOKENS[fmt])
    return _csv_rows(path, text, fmt)


def _hash_id_rows(path: Path, text: str, block_tokens: int) -> TraceRows:
    example = '{"timestamp": 0, "input_length": 600, "output_length": 40, "hash_ids": [0, 1]}'
    kept = _Kept()
    for lineno, row in json_rows(text.splitlines(), path, example):
        stamp = _number(row.get("timestamp"), "timestamp (ms)", path, lineno) / 1000.0
        prompt = _tokens(row.get("input_length"), "input_length", path, lineno)
        output = _tokens(row.get("output_length"), "output_length", path, lineno)
        ids = row.get("hash_ids", [])
        if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
            raise ConfigError(f"{path}:{lineno}: 'hash_ids' must be a list of whole numbers, got {ids!r}")
        if len(ids) > math.ceil(prompt / block_tokens):
            raise ConfigError(
                f"{path}:{lineno}: {len(ids)} hash_ids of {block_tokens} tokens are more than input_length {prompt} "
                "holds (a Bailian trace has 16-token blocks: --dataset-format bailian)"
            )
        kept.add(stamp, prompt, output, ids)
    return kept.rows(path, block_tokens)


def _csv_rows(path: Path, text: str, fmt: TraceFormat) -> TraceRows:
    time_col, prompt_col, output_col = CSV_COLUMNS[fmt]
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in (time_col, prompt_col, output_col) if c not in [h.strip() for h in reader.fieldnames or []]]
    if missing:
        raise ConfigError(f"{path}:1: a {fmt.value} trace's header names {', '.join(missing)}; it has none of them")
    read_time = _datetime_s if fmt is TraceFormat.AZURE else _number
    kept = _Kept()
    for lineno, row in _csv_records(reader, path):
        stamp = read_time(row.get(time_col), time_col, path, lineno)
        prompt = _tokens(row.get(prompt_col), prompt_col, path, lineno)
        output = _tokens(row.get(output_col), output_col, path, lineno)
        kept.add(stamp, prompt, output)
    return kept.rows(path, None)


def _csv_records(reader: csv.DictReader, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        for row in reader:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                yield reader.line_num, {(k or "").strip(): v for k, v in row.items()}
    except csv.Error as err:
        raise ConfigError(f"{path}:{reader.line_num}: not a readable CSV row ({err})") from None


class _Kept:
    """The rows kept so far: a row with 0 prompt or 0 output tokens is only counted (the module docstring)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.blocks: list[np.ndarray] = []
        self.dropped = 0

    def add(self, stamp: float, prompt: int, output: int, ids: list[int] | None = None) -> None:
        if prompt == 0 or output == 0:
            self.dropped += 1
            return
        self.times.append(stamp)
        self.prompts.append(prompt)
        self.outputs.append(output)
        if ids is not None:
            self.blocks.append(np.asarray(ids, np.int64))

    def rows(self, path: Path, block_tokens: int | None) -> TraceRows:
        if not self.times:
            raise ConfigError(f"{path}: the trace holds no request with prompt and output tokens")
        return TraceRows(
            np.asarray(self.times, np.float64), np.asarray(self.prompts, np.int32),
            np.asarray(self.outputs, np.int32), self.blocks if block_tokens is not None else None, block_tokens,
            self.dropped,
        )  # fmt: skip


def _number(raw: object, name: str, path: Path, lineno: int) -> float:
    return row_number(raw, f"{name!r} as a number", path, lineno)


def _tokens(raw: object, name: str, path: Path, lineno: int) -> int:
    value = _number(raw, name, path, lineno)
    if value < 0 or value != int(value):
        raise ConfigError(f"{path}:{lineno}: {name!r} must be a whole number of tokens >= 0, got {raw!r}")
    return int(value)


def _datetime_s(raw: object, name: str, path: Path, lineno: int) -> float:
    """Azure's date-time strings (``2023-11-16 18:15:46.6805900``) as epoch seconds, UTC when no zone is given."""
    try:
        moment = datetime.fromisoformat(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{path}:{lineno}: {name!r} must be a date-time like 2023-11-16 18:15:46.68, "
                          f"got {raw!r}") from None  # fmt: skip
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def repeated_prefix_share(block_ids: list[np.ndarray], prompt_tokens: np.ndarray, block_tokens: int) -> float:
    """The share of prompt tokens in leading blocks some earlier request already sent: what an unbounded
    prefix cache would skip. A block's hash covers the prefix before it, so a run of leading ids seen before
    is a shared prefix; the first block not seen ends it."""
    seen: set[int] = set()
    reused = 0
    for ids, prompt in zip(block_ids, prompt_tokens.tolist(), strict=True):
        run = 0
        for h in ids.tolist():
            if h not in seen:
                break
            run += 1
        reused += min(run * block_tokens, prompt)
        seen.update(ids.tolist())
    return reused / float(prompt_tokens.sum())
