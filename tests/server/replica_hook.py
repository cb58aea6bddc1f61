"""Provisioning hooks for the autoscaling test: start a sim replica (``infer-plan serve``), print its URL; stop it.

``python -m tests.server.replica_hook up SCENARIO DIR``: starts ``serve --port 0 --scenario
SCENARIO`` in a session of its own (it outlives this hook), waits until it listens, writes its
pid to ``DIR/<port>.pid`` and prints its base URL as the last line (the server registers it).
``python -m tests.server.replica_hook down DIR``: stops the replica ``$INFER_PLAN_REPLICA_URL``.
The test stops whatever ``DIR`` still lists when it ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))")


def up(scenario: str, folder: Path) -> None:
    log = folder / f"replica-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infer_plan.cli", "serve", "--port", "0", "--internal-port", "0",
             "--scenario", scenario, "--no-access-log"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if found := LISTENING.search(log.read_text()):
            (folder / f"{found[2]}.pid").write_text(str(proc.pid))
            print(found[1])
            return
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"the replica did not start: {log.read_text()[-500:]}")


def down(folder: Path) -> None:
    port = os.environ["INFER_PLAN_REPLICA_URL"].rsplit(":", 1)[1]
    pid_file = folder / f"{port}.pid"
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    pid_file.unlink()


if __name__ == "__main__":
    if sys.argv[1] == "up":
        up(sys.argv[2], Path(sys.argv[3]))
    else:
        down(Path(sys.argv[2]))
