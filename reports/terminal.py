"""The terminal rendering: the content of :mod:`.tables` laid out with rich, what a person reads first."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..core.schema import AnyResult
from .tables import Summary, Verdict, summaries

__all__ = ["render", "render_summary"]

_HEADLINE_STYLE = {Verdict.PASS: "bold green", Verdict.FAIL: "bold red", Verdict.INFO: "bold"}
_CELL_STYLE = {"PASS": "green", "FAIL": "bold red"}


def render_summary(summary: Summary) -> Panel:
    parts: list[RenderableType] = [Text(summary.headline, style=_HEADLINE_STYLE[summary.verdict])]
    if summary.facts:
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="dim")
        facts.add_column()
        for name, value in summary.facts:
            facts.add_row(name, Text(value))
        parts.append(facts)
    parts += [Panel(Text("\n".join(block.lines)), title=block.title, expand=False) for block in summary.blocks]
    if summary.notes:
        parts.append(Text("\n".join(summary.notes)))
    for content in summary.tables:
        table = Table(title=content.title, title_justify="left")
        for i, header in enumerate(content.headers):
            table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for i, row in enumerate(content.rows):
            cells = [Text(cell, style=_CELL_STYLE.get(cell, "")) for cell in row]
            table.add_row(*cells, style="bold" if i in content.emphasis else None)
        parts.append(table)
    return Panel(Group(*parts), title=summary.title, expand=False)


def render(result: AnyResult, console: Console) -> None:
    """Any result, by kind (every command, and ``infer-plan report``)."""
    for summary in summaries(result):
        console.print(render_summary(summary))
