"""The JSON access log, kept off the request path.

One JSON object per request: method, path, status, ms, tier, remote address, bytes; no
key and no input. Formatting a line and writing it through :mod:`logging` for every
request cost about 45% of the server's throughput on one core (measured with
``benchmarks/bench_server.py``). Here the request path only appends a tuple to a list;
a background task of the app formats the whole list and writes it in one call every
100 ms, and once more when the server stops, so no line is lost to a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..api_errors import CLIENT_GONE

__all__ = ["AccessLog", "JsonAccessLogger"]

_FIELDS = ("method", "path", "status", "ms", "tier", "remote", "bytes")
Entry = tuple[str, str, int, float, str | None, str | None, int]


class AccessLog:
    """Entries buffered in memory, written in bulk by :meth:`run` (an app background task)."""

    def __init__(self, stream: TextIO | None = None, *, flush_every_s: float = 0.1, max_pending: int = 100_000) -> None:
        self.stream = stream or sys.stderr
        self.flush_every_s = flush_every_s
        self.max_pending = max_pending  # past this (the stream is stuck), entries are counted, not kept
        self._pending: list[Entry] = []
        self.dropped = 0

    def add(self, entry: Entry) -> None:
        if len(self._pending) < self.max_pending:
            self._pending.append(entry)
        else:
            self.dropped += 1

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        lines = [json.dumps(dict(zip(_FIELDS, entry, strict=True)), separators=(",", ":")) for entry in batch]
        if self.dropped:
            lines.append(json.dumps({"dropped_access_log_entries": self.dropped}))
            self.dropped = 0
        if lines:
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr must not stop the server
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.flush_every_s)
                self.flush()
        finally:
            self.flush()


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp's per-request hook; its ``logger`` is the :class:`AccessLog` (aiohttp passes it through)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(CLIENT_GONE):
            return  # the error middleware logged it once, as a client disconnect
        self.logger.add(  # type: ignore[attr-defined]
            (
                request.method,
                request.path,
                response.status,
                round(time * 1000.0, 3),
                request.get("tier"),
                request.remote,
                response.body_length,
            )
        )

    @property
    def enabled(self) -> bool:
        return True
