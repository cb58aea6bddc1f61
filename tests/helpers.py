"""Starting real server processes on 127.0.0.1 for tests, and always stopping them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infer_plan.loadtests.target import ServerProcess, server_process

DEV_KEYS = {0: "dev-enterprise", 1: "dev-paid", 2: "dev-free"}
REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, timeout: float = 240, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """``infer-plan ARGS`` in a child process, output captured, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "infer_plan.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def running_server(
    *args: str, env: dict[str, str] | None = None, startup_s: float = 60.0, access_log: bool = False
) -> Iterator[ServerProcess]:
    """``infer-plan serve --port 0 ARGS`` with its log in a temporary file; stopped on exit.

    The repository root is on PYTHONPATH so ``--backend tests.server.faulty:...`` imports.
    """
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child_env.get("PYTHONPATH")]))
    flags = [] if access_log else ["--no-access-log"]
    with (
        tempfile.TemporaryDirectory(prefix="infer-plan-test-") as tmp,
        server_process(*flags, *args, log_path=Path(tmp) / "server.log", env=child_env, startup_s=startup_s) as server,
    ):
        yield server
