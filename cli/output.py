"""Where results go: the terminal, JSON (stdout for --json, a file for --save/--json FILE), JUnit, HTML."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from ..core.errors import UsageError
from ..core.schema import AnyResult, LoadTestResult, SweepResult

__all__ = ["emit_json", "render_result", "terminal", "write_result_files"]


def terminal() -> Console:
    """The stdout console; wide enough for the tables even when piped (rich assumes 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def render_result(result: AnyResult) -> None:
    from ..reports.terminal import render

    render(result, terminal())


def emit_json(result: BaseModel, *, print_it: bool, path: Path | None) -> None:
    text = result.model_dump_json(indent=2)
    if path is not None:
        try:
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror}") from None
    if print_it:
        sys.stdout.write(text + "\n")


def write_result_files(
    result: AnyResult, *, json_file: Path | None, junit_file: Path | None = None, html_file: Path | None = None
) -> None:
    emit_json(result, print_it=False, path=json_file)
    if junit_file is not None and isinstance(result, LoadTestResult | SweepResult):
        from ..loadtests.junit import write_junit

        write_junit(result, junit_file)
    if html_file is not None:
        from ..reports.html import write_html

        write_html(result, html_file)
