"""Every command's --help shows each option's help text as it is written (rich must not eat ``[...]``)."""

import os
import re
import subprocess
import sys

import pytest
from infer_plan.cli.app import command

from tests.helpers import run_cli

COMMANDS = command().commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_option_text_as_written(name):
    wide = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    shown = subprocess.run(
        [sys.executable, "-m", "infer_plan.cli", name, "--help"], capture_output=True, text=True, env=wide, check=True
    ).stdout
    flat = re.sub(r"\s+", " ", shown)
    written = [p for p in COMMANDS[name].params if getattr(p, "help", None)]
    assert written, f"{name} has options with help"
    for param in written:
        source = re.sub(r"\s+", " ", param.help.replace("\\[", "["))  # as the source wrote it, before escaping
        assert source in flat, f"{name} {param.opts[0]}: {source!r} is not shown as written"


def test_an_unknown_flag_suggests_only_near_names():
    def error(*args: str) -> str:
        done = run_cli(*args, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        return done.stderr

    assert "Possible options" not in error("simulate", "--bogus")
    assert "Possible options: --gpus" in error("simulate", "--gpu", "3")
    assert "--warmup-batches" in error("calibrate", "--warmup", "2", "--out", "x.toml")
