"""``infer-plan backends``: the engines installed and each one's options, read from their typed ``Options``."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from ..server.backends.base import backend_class, backend_names
from .options import JsonFlagOpt

__all__ = ["backends"]


def backends(json_out: JsonFlagOpt = False) -> None:
    """List the backends serve and calibrate can run (entry points 'infer_plan.backends') and their options."""
    listed = {name: _options(name) for name in backend_names()}
    if json_out:
        print(json.dumps(listed, indent=2))
        return
    table = Table(title="Backends: --backend NAME, their options as -o KEY=VALUE (or the shared flags)")
    for column in ("backend", "option", "type", "default", "what it is"):
        table.add_column(column)
    for name, options in listed.items():
        rows = options or [{"option": "-", "type": "", "default": "", "help": "no options"}]
        for i, row in enumerate(rows):
            table.add_row(name if i == 0 else "", row["option"], row["type"], row["default"], row["help"])
    Console().print(table)


def _options(name: str) -> list[dict[str, Any]]:
    fields = backend_class(name).Options.model_fields
    return [
        {
            "option": key,
            "type": getattr(info.annotation, "__name__", str(info.annotation)),
            "default": "required" if info.is_required() else repr(info.get_default(call_default_factory=True)),
            "help": info.description or "",
        }
        for key, info in fields.items()
    ]
