"""The ``--target sim`` server: ``infer-plan serve`` on 127.0.0.1 for the length of a run."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from ..sim.errors import InferPlanError
from ..sim.params import ServiceModel

__all__ = ["local_sim_server"]

_ANNOUNCE = re.compile(r"listening on (http://\S+)")


@contextlib.contextmanager
def local_sim_server(model: ServiceModel, gpus: int, keys: Path | None, startup_s: float = 60.0) -> Iterator[str]:
    """Start the reference server with the sim backend and this exact model; yield its URL; stop it."""
    with tempfile.TemporaryDirectory(prefix="infer-plan-target-") as tmp:
        scenario = Path(tmp) / "model.toml"
        service = model.model_dump(mode="json", exclude_none=True)
        service["gpus"] = gpus
        scenario.write_text(tomli_w.dumps({"service": service}), encoding="utf-8")
        log_path = Path(tmp) / "server.log"
        cmd = [
            sys.executable,
            "-m",
            "infer_plan.cli",
            "serve",
            "--port",
            "0",
            "--no-access-log",
            "--scenario",
            str(scenario),
        ]
        if keys is not None:
            cmd += ["--keys", str(keys)]
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            url = _await_announce(proc, startup_s, log_path)
            yield url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout:
                proc.stdout.close()


def _await_announce(proc: subprocess.Popen, startup_s: float, log_path: Path) -> str:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        match = _ANNOUNCE.search(line)
        if match:
            return match.group(1)
        if not line and proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise InferPlanError(f"the sim target server exited with {proc.returncode}: {tail[0]}")
    raise InferPlanError(f"the sim target server did not start within {startup_s:g} s")
