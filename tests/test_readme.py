"""The documentation's commands run as written: every `infer-plan` line of the bash blocks of the README,
CONTRIBUTING.md and docs/ that needs no server, in reading order, in a scratch folder beside the repository's
examples; and every console block that shows a command's output shows what that command prints today.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import REPO, run_cli

# Reading order: a later page's command may read what an earlier one saved.
PAGES = [REPO / "README.md", *(REPO / "docs" / f"{name}.md" for name in (
    "model", "planning", "calibration", "serving", "load-testing", "ci", "architecture", "benchmarks"
)), REPO / "CONTRIBUTING.md"]  # fmt: skip
README = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
# Commands that start or need a server, a model download or another machine are run by their own tests.
NEEDS_MORE = {"serve", "loadtest", "tiny-model"}


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README, flags=re.DOTALL)


def _needs_more(args: list[str]) -> bool:
    return args[0] in NEEDS_MORE or (args[0] == "calibrate" and "--backend" in args)


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for text in block.replace("\\\n", " ").splitlines():  # a command continued with a backslash is one line
            line = text.split("  #", 1)[0].strip()
            if line.startswith("infer-plan ") and not _needs_more(args := shlex.split(line)[1:]):
                commands.append(args)
    return commands


COMMANDS = _commands()


def test_every_page_is_read_and_the_readme_is_a_front_door():
    assert sorted((REPO / "docs").glob("*.md")) == sorted(p for p in PAGES if p.parent.name == "docs")
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_every_link_between_pages_leads_to_a_page_and_heading():
    anchors = {page: {_anchor(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)} for page in PAGES}
    for page in PAGES:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#]*)(?:#([^)]*))?\)", page.read_text()):
            linked = (page.parent / target).resolve() if target else page
            assert linked.exists(), (page.name, target)
            if anchor and linked.suffix == ".md":
                assert anchor in anchors.get(linked, set()), (page.name, target, anchor)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_has_runnable_commands():
    assert len(COMMANDS) >= 8
    assert ["capacity", "--rps", "10000"] in [c[:3] for c in COMMANDS]


@pytest.mark.slow  # every command of every page, about 75 s; the console blocks stay in the quick suite
@pytest.mark.timeout(600)
def test_every_readme_command_without_a_server_runs_as_written(tmp_path: Path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    for args in COMMANDS:  # in order: a later command may read what an earlier one saved
        done = run_cli(*args, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr


CONSOLE = [b for b in _blocks("console") if b.startswith("$ infer-plan ")]


@pytest.mark.parametrize("block", [b for b in CONSOLE if not _needs_more(shlex.split(b.partition("\n")[0])[2:])])
def test_console_blocks_show_what_the_command_prints(block: str):
    command, _, shown = block.partition("\n")
    done = run_cli(*shlex.split(command.removeprefix("$ infer-plan ")), timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    assert printed == [line.rstrip() for line in shown.splitlines()]
