"""The ``infer-plan`` command: one Typer app, one place that turns errors into exit codes.

Exit codes everywhere: 0 success, 1 a gate or constraint failed, 2 bad usage or input.
Errors below the CLI are typed (:class:`~infer_plan.core.errors.InferPlanError`); here
they become one line on stderr, never a traceback.
"""

from __future__ import annotations

import difflib
import sys

import typer
from rich.markup import escape

try:  # typer >= 0.25 vendors click; its exceptions are the ones raised here
    from typer import _click as click
    from typer._click.exceptions import NoSuchOption
except ImportError:  # pragma: no cover - older typer uses the click distribution
    import click
    from click.exceptions import NoSuchOption

from ..core.errors import InferPlanError
from .backends import backends
from .calibrate import calibrate
from .capacity import capacity
from .loadtest import loadtest
from .options import FLAG_OF
from .profile import profile
from .report import report
from .serve import serve
from .simulate import simulate
from .tiny_model import tiny_model

app = typer.Typer(
    name="infer-plan",
    help="Plan, serve and verify a batched inference service.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(simulate)
app.command()(capacity)
app.command()(serve)
app.command()(loadtest)
app.command()(calibrate)
app.command()(profile)
app.command()(report)
app.command(name="tiny-model")(tiny_model)
app.command()(backends)


def command() -> click.Group:
    """The click command behind the app, its help texts escaped for rich.

    Typer renders help with rich, which reads ``[...]`` as markup and drops it:
    "TOML file ([service], [load], [run])" would show as "TOML file (, , )".
    """
    group = typer.main.get_command(app)
    for sub in group.commands.values():
        for param in sub.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
    return group


def _near(typed: str, options: list[str]) -> list[str]:
    """Options a typo plausibly meant: the typed name starts one, or nearly spells one (``--gpu`` -> ``--gpus``)."""
    word = typed.lstrip("-")
    names = {option.lstrip("-"): option for option in options}
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.75)
    return sorted({names[n] for n in close} | {o for n, o in names.items() if word and n.startswith(word)})


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (also used by tests)."""
    try:
        result = command().main(args=argv, standalone_mode=False, prog_name="infer-plan")
        return result if isinstance(result, int) else 0
    except InferPlanError as err:
        setting = FLAG_OF.get(err.field, err.field) if err.field else None
        print(f"infer-plan: error: {setting + ': ' if setting else ''}{err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        print("infer-plan: aborted", file=sys.stderr)
        return 130
    except click.ClickException as err:
        if isinstance(err, NoSuchOption) and err.possibilities:  # click suggests even distant names
            err.possibilities = _near(err.option_name, err.possibilities)
        where = f"{err.ctx.command_path}: " if getattr(err, "ctx", None) else ""
        print(f"infer-plan: error: {where}{err.format_message()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
