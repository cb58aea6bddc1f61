"""A workload file's rows, read one way for traces and datasets: JSON lines, timestamps and tiers.

Every bad row is one line naming the file and its line number (exit 2 at the CLI), so a
trace of a million rows with one typo says where it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ...core.errors import ConfigError
from ...core.tiers import Tier

__all__ = ["json_rows", "row_number", "row_tier", "row_timestamp"]


def json_rows(lines: Iterable[str], path: Path, example: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line; ``example`` shows the expected object in the error."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{lineno}: expected an object like {example}")
        yield lineno, row


def row_timestamp(raw: object, path: Path, lineno: int) -> float | None:
    """A row's time in seconds (a number, or a CSV cell holding one); None when the row has none."""
    if raw is None or raw == "":
        return None
    return row_number(raw, "a timestamp in seconds", path, lineno)


def row_number(raw: object, what: str, path: Path, lineno: int) -> float:
    """A row's number (JSON's, or a CSV cell holding one); ``what`` names it in the one-line error."""
    try:
        if isinstance(raw, bool) or raw is None:
            raise TypeError
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{path}:{lineno}: expected {what}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{path}:{lineno}: expected a finite {what.removeprefix('a ')}, got {raw!r}")
    return value


def row_tier(raw: object, default: Tier, path: Path, lineno: int) -> int:
    """A row's tier by name; ``default`` when it names none."""
    if raw in (None, ""):
        return int(default)
    try:
        return int(Tier.parse(str(raw)))
    except ValueError as err:
        raise ConfigError(f"{path}:{lineno}: {err}") from None
