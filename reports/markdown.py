"""Markdown renderings, for pull-request comments from CI (GitHub-flavoured tables)."""

from __future__ import annotations

from ..core.schema import AnyResult
from .tables import Summary, Table, summaries

__all__ = ["result_markdown"]


def _cell(text: str, bold: bool = False) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold and text else text


def _table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.headers) + " |"]
    lines.append("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(table.headers))) + "|")
    lines += ["| " + " | ".join(_cell(c, i in table.emphasis) for c in row) + " |" for i, row in enumerate(table.rows)]
    return [*lines, ""]


def result_markdown(result: AnyResult) -> str:
    return "\n".join(_summary_markdown(summary) for summary in summaries(result))


def _summary_markdown(summary: Summary) -> str:
    lines = [f"### {summary.title}", "", f"**{_cell(summary.headline)}**", ""]
    lines += [f"- {name}: {_cell(value)}" for name, value in summary.facts]
    lines.append("")
    for block in summary.blocks:
        lines += [f"**{block.title}**", "", "```", *block.lines, "```", ""]
    if summary.notes:
        lines += [*summary.notes, ""]
    for table in summary.tables:
        lines += _table(table)
    return "\n".join(lines).rstrip() + "\n"
