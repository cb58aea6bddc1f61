"""``infer-plan report RESULT.json``: render a saved result again (terminal, HTML, Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UsageError
from ..core.schema import load_result
from ..reports.html import write_html
from ..reports.markdown import result_markdown
from .output import render_result


def report(
    result_file: Annotated[Path, typer.Argument(help="A result saved with --json/--save by any command.")],
    html_file: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML page with plots.")
    ] = None,
    markdown_file: Annotated[
        Path | None, typer.Option("--markdown", help="Write Markdown (for a PR comment); '-' prints it.")
    ] = None,
) -> None:
    """Render a saved simulate, capacity, loadtest or calibrate result."""
    result = load_result(result_file)
    if html_file is not None:
        write_html(result, html_file)
    if markdown_file is not None:
        text = result_markdown(result)
        if str(markdown_file) == "-":
            typer.echo(text, nl=False)
            return
        try:
            markdown_file.write_text(text, encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {markdown_file}: {err.strerror}") from None
    render_result(result)
