"""A fault-injecting backend for the reliability tests, loaded with ``--backend tests.server.faulty:FaultyBackend``.

It behaves like the sim backend unless a batch holds a poisoned input, so a test can
put one fault into one batch and check that every request of that batch (and only
that batch) gets its error while the worker goes on serving.
"""

from __future__ import annotations

import asyncio
from typing import Any

from infer_plan.server.backends.base import BackendError, Generate, Generated
from infer_plan.server.backends.sim_gpu import SimBackend

RAISE, FAIL, HANG, SHORT = "fault:raise", "fault:backend-error", "fault:hang", "fault:short"
MID_STREAM = "fault:mid-stream"  # streamed requests get one token, then the engine fails
STEP_CRASH = "fault:step-crash"  # continuous batching: the step loop dies as it admits this one


class _CrashingFeed:
    """The pool's feed as the step loop sees it, but admitting :data:`STEP_CRASH` kills the loop (a bug of the
    engine's own, with other requests running)."""

    def __init__(self, feed: Any) -> None:
        self._feed = feed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._feed, name)

    def take(self, pending: Any = None) -> Any:
        taken = self._feed.take(pending)
        if taken.request.prompt == STEP_CRASH:
            raise RuntimeError("injected crash in the step loop")
        return taken


class FaultyBackend(SimBackend):
    async def run_continuous(self, gpu: int, feed: Any) -> None:
        await super().run_continuous(gpu, _CrashingFeed(feed))

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        if any(r.prompt == MID_STREAM for r in requests):
            for request in requests:
                if request.sink is not None:
                    request.sink.token(" first")
            await asyncio.sleep(0.05)
            raise BackendError("injected engine failure mid-stream")
        outputs = await super().run_batch(requests, gpu)
        inputs = [r.prompt for r in requests]
        if RAISE in inputs:
            raise RuntimeError("injected crash mid-batch")
        if FAIL in inputs:
            raise BackendError("injected engine failure")
        if HANG in inputs:
            await asyncio.sleep(3600)
        if SHORT in inputs:
            return outputs[:-1]
        return outputs
