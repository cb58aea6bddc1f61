"""``serve --instances N``: N server processes behind the same ports, sharing one Redis queue.

One Python process tops out around one core of HTTP work; N processes bound with
SO_REUSEPORT let the kernel spread connections over them while Redis makes them one
service (``shared_queue``). This supervisor only starts, watches and stops them: it
forwards SIGTERM/SIGINT (each child drains as a lone server would), restarts a child
that dies while the service is up, and exits non-zero if a child did.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

from ..core.errors import UsageError
from .config import ServerConfig
from .runner import Listening, bind, run_server

__all__ = ["run_instances"]

log = logging.getLogger("infer_plan.server.instances")

RESTART_DELAY_S = 1.0
STARTUP_S = 120.0


def run_instances(config: ServerConfig, count: int, announce: Callable[[Listening], None]) -> int:
    """Run ``count`` children until a signal; returns the exit code (0 when all drained cleanly)."""
    if config.redis_url is None:
        raise ValueError("instances share their queues in Redis: config.redis_url must be set")
    # Reserve the ports (bound, never listening) so `--port 0` resolves once for all children.
    reserved = [_reserve(config.host, config.port)]
    reserved.append(_reserve(config.internal_host, config.resolved_internal_port))
    child_config = dataclasses.replace(
        config, port=reserved[0].getsockname()[1], internal_port=reserved[1].getsockname()[1], reuse_port=True
    )
    ctx = mp.get_context("spawn")
    children: list[_Child] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            child.signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        children.extend(_Child(ctx, child_config, i) for i in range(count))
        first = None
        for child in children:
            where = child.wait_ready(STARTUP_S)
            if where is None:
                raise UsageError(f"instance {child.index} did not start (exit code {child.process.exitcode})")
            first = first or where
        if not stopping and first is not None:
            announce(first)
        while any(c.process.is_alive() for c in children):
            wait([c.process.sentinel for c in children if c.process.is_alive()], timeout=0.5)
            for i, child in enumerate(children):
                if not stopping and not child.process.is_alive():
                    code = child.process.exitcode
                    log.error("instance %d (pid %s) exited with %s; restarting it", i, child.pid, code)
                    time.sleep(RESTART_DELAY_S)
                    children[i] = _Child(ctx, child_config, i)
        return 1 if any(c.process.exitcode for c in children) else 0
    finally:
        for child in children:
            if child.process.is_alive():
                child.signal(signal.SIGKILL if not stopping else signal.SIGTERM)
                child.process.join(30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in reserved:
            sock.close()


class _Child:
    def __init__(self, ctx: mp.context.SpawnContext, config: ServerConfig, index: int) -> None:
        self.index = index
        self._ready, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child_main, args=(config, child_end), name=f"instance-{index}")
        self.process.start()
        self.pid = self.process.pid
        child_end.close()

    def wait_ready(self, timeout: float) -> Listening | None:
        if self._ready.poll(timeout):
            try:
                return self._ready.recv()
            except EOFError:
                return None
        return None

    def signal(self, signum: int) -> None:
        if self.pid is not None and self.process.is_alive():
            os.kill(self.pid, signum)


def _child_main(config: ServerConfig, ready: Connection) -> None:
    os.setpgrp()  # Ctrl-C reaches the supervisor only; it forwards one SIGTERM (a second would skip the drain)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    def on_ready(where: Listening) -> None:
        ready.send(where)
        ready.close()

    run_server(config, on_ready=on_ready)


def _reserve(host: str, port: int) -> socket.socket:
    return bind(host, port, reuse_port=True, listen=False)
