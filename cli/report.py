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

ResultArg = Annotated[Path, typer.Argument(help="A result saved with --json/--save by any command.")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML page with plots.")]
MarkdownOpt = Annotated[
    Path | None, typer.Option("--markdown", help="Write Markdown (for a PR comment); '-' prints it.")
]


def report(result_file: ResultArg, html_file: HtmlOpt = None, markdown_file: MarkdownOpt = None) -> None:
    """Render any saved result (simulate, capacity, a hardware plan, loadtest, sweep, calibrate): terminal or files."""
    result = load_result(result_file)
    if html_file is not None:
        write_html(result, html_file)
        typer.echo(f"wrote {html_file}", err=True)
    if markdown_file is not None:
        text = result_markdown(result)
        if str(markdown_file) == "-":
            typer.echo(text, nl=False)
        else:
            try:
                markdown_file.write_text(text, encoding="utf-8")
            except OSError as err:
                raise UsageError(f"cannot write {markdown_file}: {err.strerror}") from None
            typer.echo(f"wrote {markdown_file}", err=True)
    if html_file is None and markdown_file is None:
        render_result(result)
