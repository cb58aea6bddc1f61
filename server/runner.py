"""Running a server process: bind, announce, serve, and drain on SIGTERM/SIGINT.

Drain order: stop admitting (new requests get 503 with Retry-After on the still-open
listener), let queued and running batches finish and their responses go out, then
close the listeners and exit 0. A second signal, or the drain timeout, cuts it short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..core.errors import UsageError
from .config import ServerConfig
from .http.access_log import JsonAccessLogger
from .http.app import build_apps, make_state

__all__ = ["Listening", "bind", "run_server", "serve"]

log = logging.getLogger("infer_plan.server")


@dataclass(frozen=True)
class Listening:
    """Where a started server listens and what it serves; handed to the on_ready callback (picklable)."""

    public: tuple[str, int]
    internal: tuple[str, int]
    model_name: str
    tiers: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://{_fmt_host(self.public[0])}:{self.public[1]}"

    @property
    def internal_url(self) -> str:
        return f"http://{_fmt_host(self.internal[0])}:{self.internal[1]}"


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request (bad header bytes, broken framing) with a traceback.

    It already answered 400; the fault is the client's, so one line is enough, and a
    traceback in the log stays the sign of a bug of ours.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what = record.getMessage()
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            record.msg, record.args = "%s: %s", (what, detail)
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A server socket; ``reuse_port`` lets sibling processes bind the same port (the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    if listen:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(
    config: ServerConfig, *, on_ready: Callable[[Listening], None] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; then drain and return."""
    state = make_state(config)
    if config.dev_keys_exposed:
        log.warning(
            "WARNING: serving the public development keys on %s: anyone who can reach it gets enterprise "
            "priority; pass --keys FILE for real keys",
            config.host,
        )
    protocol_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientProtocolErrors) for f in protocol_log.filters):
        protocol_log.addFilter(_ClientProtocolErrors())
    public_app, internal_app = build_apps(state)
    public_runner = web.AppRunner(
        public_app,
        access_log_class=JsonAccessLogger,
        access_log=state.access_log,  # type: ignore[arg-type]  (aiohttp hands it to JsonAccessLogger as is)
        handle_signals=False,
    )
    internal_runner = web.AppRunner(internal_app, access_log=None, handle_signals=False)
    public_sock = bind(config.host, config.port, reuse_port=config.reuse_port)
    internal_sock = bind(config.internal_host, config.resolved_internal_port, reuse_port=config.reuse_port)
    host, port = internal_sock.getsockname()[:2]
    state.internal_url = f"http://{_fmt_host(host)}:{port}"
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1 and drain_task is not None:
            log.warning("second signal: stopping without waiting for the drain")
            drain_task.cancel()
        stop.set()

    drain_task: asyncio.Task | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    await public_runner.setup()
    await internal_runner.setup()
    try:
        await web.SockSite(public_runner, public_sock, shutdown_timeout=config.drain_timeout_s).start()
        await web.SockSite(internal_runner, internal_sock).start()
        # Everything loaded so far lives as long as the server: collect once and take it out of the collector's
        # sight, so a full collection during traffic scans only what requests made. Without this a burst just
        # after start-up could meet a collection over every imported module's objects (tens of ms with the loop
        # stalled: a batch assembled from the first request alone, the rest arriving behind it).
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            on_ready(
                Listening(
                    public_sock.getsockname()[:2],
                    internal_sock.getsockname()[:2],
                    state.model_name,
                    tuple(t.label for t in state.keys.tiers_present),
                )
            )
        await stop.wait()
        state.draining = True
        queue, pool = state.queue, state.pool
        assert queue is not None and pool is not None  # made before the listeners started
        log.info("draining: %d queued, %d batches running", queue.queued, pool.running)
        queue.drain()
        drain_task = asyncio.create_task(pool.wait_idle())
        try:
            await asyncio.wait_for(drain_task, config.drain_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("drain cut short with %d queued", queue.queued)
        await asyncio.sleep(0.05)  # let handlers whose futures just resolved write their responses
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await internal_runner.cleanup()
        await public_runner.cleanup()
        if state.access_log is not None:
            state.access_log.flush()  # requests answered while the listeners closed


def run_server(config: ServerConfig, on_ready: Callable[[Listening], None] | None = None) -> None:
    """Blocking entry point for the CLI: uvloop when installed, asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, on_ready=on_ready))
    else:
        uvloop.run(serve(config, on_ready=on_ready))
