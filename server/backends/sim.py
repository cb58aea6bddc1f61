"""The simulated GPU: sleeps the service model's cycle per batch, answers deterministically.

It lets the reference server run anywhere and makes measured latency comparable with
the simulator's: both take their cycle from the same :class:`ServiceModel`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from ...sim.params import ServiceModel
from .base import Backend

__all__ = ["SimBackend", "sim_output"]


def sim_output(text: str) -> str:
    """The deterministic answer to one input, so clients can check they got their own."""
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"sim:{digest}:{len(text)}"


@Backend.register("sim")
class SimBackend(Backend):
    def __init__(self, model: ServiceModel, **_: object) -> None:
        # The server's batcher always overlaps assembly with GPU work, so the GPU holds
        # a batch for PCIe in + kernel + PCIe out (+ per-item time) only.
        self.model = model.model_copy(update={"overlap": True})
        self._uniform = random.Random(0).random  # draws quantiles of a measured cycle_jitter

    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        quantile = self._uniform() if self.model.cycle_jitter else None
        cycle_s = self.model.gpu_cycle_ms(len(inputs), quantile=quantile) / 1000.0
        if cycle_s > 0:
            await asyncio.sleep(cycle_s)
        return [sim_output(text) for text in inputs]
