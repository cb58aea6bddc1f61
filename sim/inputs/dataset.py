"""Request lengths (and optionally arrival times and tiers) from a dataset file.

Formats (``--dataset-format``, detected from the first row when not given):

- JSONL, one request a line: ``{"prompt_tokens": 512, "output_tokens": 128}`` with an
  optional ``"timestamp"`` (seconds) and ``"tier"``. With timestamps the file is a
  trace: it sets the arrivals too.
- ShareGPT's conversation JSON (a list of ``{"conversations": [{"from": "human",
  "value": ...}, {"from": "gpt", "value": ...}, ...]}``), the format ``vllm bench serve``
  reads: the first human turn is the prompt, the reply after it the output. Tokens are
  counted with the tokenizer given (a Hugging Face tokenizer's name or folder), or
  estimated at 4 characters per token when none is given; the dataset says which.
- The public traces as published: Mooncake and Bailian JSONL, Azure LLM inference CSV,
  BurstGPT CSV, Vidur's processed CSV (:mod:`.public_traces`). Their timestamps make
  them traces.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import ConfigError
from ...core.tiers import Tier
from ...core.tokens import CHARS_PER_TOKEN, estimated_tokens, load_tokenizer
from .public_traces import TraceFormat, detect_format, read_public_trace
from .rows import json_rows, row_tier, row_timestamp

__all__ = ["CHARS_PER_TOKEN", "Dataset", "TraceFormat", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    prompt_tokens: np.ndarray  # int32, one per request
    output_tokens: np.ndarray  # int32
    counted_with: str  # how the lengths were obtained, for the report
    times: np.ndarray | None = None  # seconds from the first request, when the file had timestamps
    tiers: np.ndarray | None = None  # int8, when it had timestamps (a row without a tier is free)
    block_ids: list[np.ndarray] | None = None  # per request, its prompt's block hash ids (Mooncake, Bailian)
    block_tokens: int | None = None  # the tokens each of those ids stands for

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)


def load_dataset(path: Path, tokenizer: str | None = None, fmt: TraceFormat = TraceFormat.AUTO) -> Dataset:
    if not path.is_file():
        raise ConfigError(f"dataset file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a CSV saved by a spreadsheet starts with a byte-order mark
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text dataset ({err})") from err
    if not text.strip():
        raise ConfigError(f"{path}: the dataset holds no requests")
    fmt = detect_format(path, text) if fmt is TraceFormat.AUTO else fmt
    if fmt is TraceFormat.SHAREGPT:
        return _sharegpt(path, text, tokenizer)
    if fmt is TraceFormat.JSONL:
        return _jsonl(path, text)
    rows = read_public_trace(path, text, fmt)
    order = np.argsort(rows.times_s, kind="stable")
    times = rows.times_s[order]
    return Dataset(
        prompt_tokens=rows.prompt_tokens[order],
        output_tokens=rows.output_tokens[order],
        counted_with=rows.describe(fmt),
        times=times - times[0],
        tiers=np.full(times.size, int(Tier.FREE), np.int8),
        block_ids=None if rows.block_ids is None else [rows.block_ids[k] for k in order.tolist()],
        block_tokens=rows.block_tokens,
    )


def _jsonl(path: Path, text: str) -> Dataset:
    prompts, outputs, stamps, tiers = [], [], [], []
    for lineno, row in json_rows(text.splitlines(), path, '{"prompt_tokens": 5, "output_tokens": 9}'):
        prompts.append(_count(row, "prompt_tokens", path, lineno))
        outputs.append(_count(row, "output_tokens", path, lineno))
        stamps.append(row_timestamp(row.get("timestamp"), path, lineno))
        tiers.append(row_tier(row.get("tier"), Tier.FREE, path, lineno))
    if not prompts:
        raise ConfigError(f"{path}: the dataset holds no requests")
    timed = [s is not None for s in stamps]
    if any(timed) and not all(timed):
        raise ConfigError(f"{path}:{timed.index(not timed[0]) + 1}: give a timestamp on every line or on none")
    data = Dataset(np.asarray(prompts, np.int32), np.asarray(outputs, np.int32), "the dataset's token counts")
    if not all(timed):
        return data
    order = np.argsort(np.asarray(stamps, float), kind="stable")
    times = np.asarray(stamps, float)[order]
    return Dataset(
        prompt_tokens=data.prompt_tokens[order],
        output_tokens=data.output_tokens[order],
        counted_with=data.counted_with,
        times=times - times[0],
        tiers=np.asarray(tiers, np.int8)[order],
    )


def _count(row: dict[str, Any], key: str, path: Path, lineno: int) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1 or value != int(value):
        raise ConfigError(f"{path}:{lineno}: {key!r} must be a whole number of tokens >= 1, got {value!r}")
    return int(value)


def _sharegpt(path: Path, text: str, tokenizer: str | None) -> Dataset:
    try:
        conversations = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not a ShareGPT JSON list ({err.msg} at line {err.lineno})") from None
    pairs = []
    for i, item in enumerate(conversations):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise ConfigError(f'{path}: entry {i} has no "conversations" list (ShareGPT format)')
        pair = _first_exchange(turns)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise ConfigError(f"{path}: no conversation with a human turn and a reply")
    count, counted_with = _counter(tokenizer)
    prompts = np.asarray([max(1, count(p)) for p, _ in pairs], np.int32)
    outputs = np.asarray([max(1, count(o)) for _, o in pairs], np.int32)
    return Dataset(prompts, outputs, counted_with)


def _first_exchange(turns: list[Any]) -> tuple[str, str] | None:
    for turn, reply in itertools.pairwise(turns):
        if (
            isinstance(turn, dict)
            and isinstance(reply, dict)
            and turn.get("from") in ("human", "user")
            and reply.get("from") in ("gpt", "assistant", "bard", "chatgpt")
        ):
            return str(turn.get("value", "")), str(reply.get("value", ""))
    return None


def _counter(tokenizer: str | None):
    if tokenizer is None:
        return estimated_tokens, f"estimated at {CHARS_PER_TOKEN} characters a token"
    tok = load_tokenizer(tokenizer)
    return (lambda text: len(tok.encode(text, add_special_tokens=False))), f"counted with the tokenizer {tokenizer}"
