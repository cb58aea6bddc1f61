"""``infer-plan backends``: the engines installed and each one's options, read from their typed ``Options``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..server.backends.base import backend_class, backend_names

__all__ = ["backends"]


def backends() -> None:
    """List the backends serve and calibrate can run (entry points 'infer_plan.backends') and their options."""
    table = Table(title="Backends: --backend NAME, their options as -o KEY=VALUE (or the shared flags)")
    for column in ("backend", "option", "type", "default", "what it is"):
        table.add_column(column)
    for name in backend_names():
        sub = backend_class(name)
        fields = sub.Options.model_fields
        if not fields:
            table.add_row(name, "-", "", "", (sub.__doc__ or "").strip().splitlines()[0] if sub.__doc__ else "")
        for i, (key, info) in enumerate(fields.items()):
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            kind = getattr(info.annotation, "__name__", str(info.annotation))
            table.add_row(name if i == 0 else "", key, kind, default, info.description or "")
    Console().print(table)
