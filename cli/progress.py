"""A progress display that stays out of the way of pipes, --json and --quiet."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["status_progress"]


@contextmanager
def status_progress(description: str, *, enabled: bool, total: float | None = None) -> Iterator[Progress]:
    """A transient rich progress bar on stderr; disabled when stderr is not a terminal."""
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        progress.add_task(description, total=total)
        yield progress
