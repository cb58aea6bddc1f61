"""Starting ``infer-plan serve`` as a child process on 127.0.0.1, and always stopping it.

``loadtest --target sim`` uses it for the length of a run; the tests and benchmarks use
the same code, so there is one way a server is started, announced and reaped. The
server's stderr (its logs) goes to a file the caller can read afterwards, for example
to check that no traceback was written.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import tomli_w

from ..core.errors import InferPlanError
from ..core.model import ServiceModel

__all__ = [
    "RedisProcess",
    "ServerProcess",
    "check_reachable",
    "local_sim_server",
    "redis_server",
    "server_process",
    "stop_process",
    "write_model_scenario",
]

_ANNOUNCE = re.compile(r"listening on (http://\S+) \(internal (http://\S+)\)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    internal_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (the graceful drain) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def write_model_scenario(model: ServiceModel, path: Path, gpus: int | None = None) -> Path:
    """A scenario file holding exactly ``model``, so a child server runs the same service."""
    service = model.model_dump(mode="json", exclude_none=True)
    if gpus is not None:
        service["gpus"] = gpus
    path.write_text(tomli_w.dumps({"service": service}), encoding="utf-8")
    return path


@contextlib.contextmanager
def server_process(
    *args: str, log_path: Path, env: dict[str, str] | None = None, startup_s: float = 60.0
) -> Iterator[ServerProcess]:
    """``infer-plan serve --port 0 ARGS``; yields once it announced its URL; stopped on exit."""
    cmd = [sys.executable, "-m", "infer_plan.cli", "serve", "--port", "0", *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        url, internal = _await_announce(proc, startup_s, log_path)
        yield ServerProcess(proc, url, internal, log_path)
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_sim_server(model: ServiceModel, gpus: int, keys: Path | None, startup_s: float = 60.0) -> Iterator[str]:
    """The reference server with the sim backend and this exact model; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="infer-plan-target-") as tmp:
        scenario = write_model_scenario(model, Path(tmp) / "model.toml", gpus)
        args = ["--no-access-log", "--scenario", str(scenario)]
        if keys is not None:
            args += ["--keys", str(keys)]
        with server_process(*args, log_path=Path(tmp) / "server.log", startup_s=startup_s) as server:
            yield server.url


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """A one-line error now for a target nobody answers on, rather than a run of connection errors."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout_s):
            pass
    except OSError as err:
        raise InferPlanError(f"cannot reach the target {url}: {err.strerror or err}") from None


def _await_announce(proc: subprocess.Popen, startup_s: float, log_path: Path) -> tuple[str, str]:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        match = _ANNOUNCE.search(line)
        if match:
            return match.group(1), match.group(2)
        if not line and proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise InferPlanError(f"the server exited with {proc.returncode}: {tail[0]}")
    raise InferPlanError(f"the server did not start within {startup_s:g} s")


class RedisProcess:
    """A redis-server of our own on 127.0.0.1 (no persistence) that a test can stop and restart on its port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise InferPlanError("redis-server not found: install the Debian package redis-server")
        self.binary = binary
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, startup_s: float = 10.0) -> None:
        # Flags, not a config file: no disk writes (--save ""), loopback only, logs in the test's directory.
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_s
        with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        self.stop()
        raise InferPlanError(f"redis-server did not answer on port {self.port} within {startup_s:g} s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=10.0)
            self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[RedisProcess]:
    """A fresh redis-server in a temporary directory, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="infer-plan-redis-") as tmp:
        server = RedisProcess(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
