"""Starting real server processes on 127.0.0.1 for tests, and always stopping them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

ANNOUNCE = re.compile(r"listening on (http://\S+) \(internal (http://\S+)\)")
DEV_KEYS = {0: "dev-enterprise", 1: "dev-paid", 2: "dev-free"}


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    internal_url: str

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, startup_s: float = 60.0) -> Iterator[RunningServer]:
    """``infer-plan serve --port 0 ARGS`` in a child process; stopped (and reaped) on exit."""
    cmd = [sys.executable, "-m", "infer_plan.cli", "serve", "--port", "0", "--no-access-log", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + startup_s
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            match = ANNOUNCE.search(line)
            if match:
                yield RunningServer(proc, match.group(1), match.group(2))
                return
        raise RuntimeError(f"server did not announce itself within {startup_s}s (last line {line!r})")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
