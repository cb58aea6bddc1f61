"""The simulated GPU: sleeps the service model's cycle per batch, answers deterministically.

It lets the reference server run anywhere and makes measured latency comparable with
the simulator's: both take their cycle from the same :class:`ServiceModel`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from ...core.model import ServiceModel
from .base import Backend, BackendOptions

__all__ = ["SimBackend", "sim_output"]


def sim_output(text: str) -> str:
    """The deterministic answer to one input, so clients can check they got their own."""
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"sim:{digest}:{len(text)}"


@Backend.register("sim")
class SimBackend(Backend):
    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        super().__init__(model, options)
        self._uniform = random.Random(0).random  # draws quantiles of a measured cycle_jitter

    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        # The hold only: the server's queues always overlap assembly with GPU work.
        hold_ms = self.model.batch_hold_ms(len(inputs))
        if self.model.cycle_jitter:
            hold_ms *= float(self.model.jitter(self._uniform()))
        if hold_ms > 0:
            await asyncio.sleep(hold_ms / 1000.0)
        return [sim_output(text) for text in inputs]
