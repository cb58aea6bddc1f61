"""Writing results as JSON: to stdout for --json, to a file for --save."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from ..sim.errors import UsageError

__all__ = ["emit_json", "terminal"]


def terminal() -> Console:
    """The stdout console; wide enough for the tables even when piped (rich assumes 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def emit_json(result: BaseModel, *, print_it: bool, path: Path | None) -> None:
    text = result.model_dump_json(indent=2)
    if path is not None:
        try:
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror}") from None
    if print_it:
        sys.stdout.write(text + "\n")
