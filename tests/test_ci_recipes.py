"""The CI recipes in examples/ci run as written: their shell steps, in order, on this machine.

Platform-only steps (checkout, caches, uploads, the JUnit check, the pull/merge request
comment) cannot run here; each is replaced by a check that its input files exist and
are well-formed. The install step is checked for a pinned version and the checkout's
own `infer-plan` is used instead. A healthy server passes the pipeline; one slower than
the SLO fails it with exit 1, and the always-run steps still write the summary.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

RECIPES = REPO / "examples/ci"
GITHUB, GITLAB = RECIPES / "github-actions.yml", RECIPES / "gitlab-ci.yml"
PINNED = re.compile(r"(==\d|@v?\d+\.\d+)")
# Short enough for a test, the same shape as the recipes' defaults.
TEST_LOAD = "--rps 100 --duration 8 --gpus 2 --slo-p95-ms 500"

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp_path: Path, serve_args: str) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(free_port()),
        "SERVE_ARGS": serve_args,
        "LOADTEST_ARGS": TEST_LOAD,
        "OUT": "perf",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "step-summary.md"),
        "COLUMNS": "250",
    }


def bash(script: str, env: dict[str, str], cwd: Path) -> int:
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], env=env, cwd=cwd,
                          timeout=240, check=False)  # fmt: skip
    return done.returncode


def stop_server(cwd: Path) -> None:
    pid_file = cwd / "perf/serve.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def check_outputs(cwd: Path) -> None:
    """What the platform steps would publish: the JUnit file, the HTML report, the Markdown summary."""
    cases = ET.parse(cwd / "perf/junit.xml").getroot().iter("testcase")
    assert [c.get("name") for c in cases], "JUnit file without test cases"
    assert (cwd / "perf/report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert (cwd / "perf/summary.md").read_text().startswith("### infer-plan loadtest")


def run_github(tmp_path: Path, serve_args: str) -> dict[str, int]:
    workflow = yaml.safe_load(GITHUB.read_text())
    env = environment(tmp_path, serve_args)
    results, failed = {}, False
    try:
        for step in workflow["jobs"]["perf-gate"]["steps"]:
            condition = step.get("if", "")
            if "refs/heads/main" in condition:  # a pull request: the baseline is not saved
                continue
            if failed and "always()" not in condition:
                continue
            if "uses" in step:
                inputs = step.get("with", {})
                for key in ("report_paths", "path"):
                    if key in inputs and not inputs[key].startswith("baseline"):
                        assert (tmp_path / inputs[key]).exists(), (step["uses"], inputs[key])
                continue
            if step.get("id") == "install":
                assert PINNED.search(workflow["env"]["INFER_PLAN_PIP"]), "install a pinned version"
                continue
            results[step["name"]] = rc = bash(step["run"], env, tmp_path)
            failed = failed or rc != 0
    finally:
        stop_server(tmp_path)
    return results


def run_gitlab(tmp_path: Path, serve_args: str) -> tuple[int, int]:
    job = yaml.safe_load(GITLAB.read_text())["perf-gate"]
    env = {**environment(tmp_path, serve_args), "CI_COMMIT_BRANCH": "feature", "CI_DEFAULT_BRANCH": "main"}
    install = [line for line in job["before_script"] if "pip install" in line]
    assert len(install) == 1 and PINNED.search(job["variables"]["INFER_PLAN_PIP"]), "install a pinned version"
    try:
        script_rc = bash("\n".join(job["script"]), env, tmp_path)
    finally:
        after_rc = bash("\n".join(job["after_script"]), env, tmp_path)  # GitLab runs it whatever happened
        stop_server(tmp_path)
    assert job["artifacts"]["reports"]["junit"] == "perf/junit.xml" and job["artifacts"]["when"] == "always"
    return script_rc, after_rc


def slow_server(tmp_path: Path) -> str:
    scenario = tmp_path / "slow.toml"
    scenario.write_text("[service]\nkernel_ms = 600\n")  # every batch 710 ms: P95 far past the 500 ms SLO
    return f"--backend sim --gpus 2 --scenario {scenario}"


@pytest.mark.slow  # two 10 s load tests
def test_github_actions_recipe_passes_on_a_healthy_server_and_fails_on_a_slow_one(tmp_path):
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    results = run_github(healthy, "--backend sim --gpus 2")
    assert results and all(rc == 0 for rc in results.values()), results
    check_outputs(healthy)
    assert "infer-plan loadtest" in (healthy / "step-summary.md").read_text()

    slow = tmp_path / "slow"
    slow.mkdir()
    results = run_github(slow, slow_server(slow))
    assert results["Load test and gates"] == 1, results
    assert results["Markdown summary"] == 0 and results["Stop the server"] == 0
    check_outputs(slow)
    assert "FAIL" in (slow / "perf/summary.md").read_text()


@pytest.mark.slow
def test_gitlab_recipe_passes_on_a_healthy_server_and_fails_on_a_slow_one(tmp_path):
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    assert run_gitlab(healthy, "--backend sim --gpus 2") == (0, 0)
    check_outputs(healthy)
    slow = tmp_path / "slow"
    slow.mkdir()
    assert run_gitlab(slow, slow_server(slow)) == (1, 0)
    check_outputs(slow)


def _flags_used() -> set[tuple[str, str]]:
    """(command, flag) for every `infer-plan COMMAND ... --flag` in the recipes, their variables included."""
    used = set()
    for recipe in (GITHUB, GITLAB):
        text = recipe.read_text()
        variables = dict(re.findall(r'^\s+(SERVE_ARGS|LOADTEST_ARGS): "([^"]*)"', text, re.MULTILINE))
        for match in re.finditer(r"infer-plan (\w+)([^\n]*)", text):
            command, rest = match.groups()
            rest = rest.replace("$SERVE_ARGS", variables["SERVE_ARGS"]).replace(
                "$LOADTEST_ARGS", variables["LOADTEST_ARGS"]
            )
            used |= {(command, flag) for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)}
    return used


def test_both_recipes_parse_and_use_only_flags_that_exist():
    used = _flags_used()
    assert {c for c, _ in used} == {"serve", "loadtest", "report"}
    helps = {}
    for command in {c for c, _ in used}:
        done = subprocess.run([sys.executable, "-m", "infer_plan.cli", command, "--help"], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "250"}, timeout=60, check=True)  # fmt: skip
        helps[command] = done.stdout
    missing = [(c, f) for c, f in sorted(used) if not re.search(rf"{re.escape(f)}\b", helps[c])]
    assert not missing, missing
