"""Measuring a backend's batch latency against batch size, as the server's GPU worker sees it.

The backend is driven directly (no HTTP, no queueing): each measurement is one
``run_batch`` call, the same call a GPU worker makes, so the profile holds exactly the
time a batch occupies its GPU. Sizes are visited in a shuffled order on every
repetition, so a slow drift of the machine does not masquerade as a size effect, and
warm-up batches (first-call compilation, cache allocation) are run and discarded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend, BackendError

__all__ = ["BatchTimings", "measure_batches"]


@dataclass
class BatchTimings:
    sizes: list[int]
    samples_ms: dict[int, list[float]]

    def median_ms(self) -> list[float]:
        return [float(np.median(self.samples_ms[s])) for s in self.sizes]

    def p95_ms(self) -> list[float]:
        return [float(np.percentile(self.samples_ms[s], 95)) for s in self.sizes]


async def measure_batches(
    backend: Backend,
    sizes: list[int],
    repetitions: int,
    warmup: int,
    *,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> BatchTimings:
    """Time ``repetitions`` batches of every size (after ``warmup`` discarded ones of the largest)."""
    rng = random.Random(seed)
    counter = 0

    def inputs(n: int) -> list[str]:
        nonlocal counter
        counter += 1
        return [f"calibration prompt {counter}-{i}: the quick brown fox jumps over the lazy dog" for i in range(n)]

    for _ in range(warmup):
        await backend.run_batch(inputs(max(sizes)), 0)
        if on_batch:
            on_batch()
    samples: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(repetitions):
        order = list(sizes)
        rng.shuffle(order)
        for size in order:
            batch = inputs(size)
            started = time.perf_counter()
            outputs = await backend.run_batch(batch, 0)
            samples[size].append((time.perf_counter() - started) * 1000.0)
            if len(outputs) != size:
                raise BackendError(f"backend returned {len(outputs)} outputs for a batch of {size}")
            if on_batch:
                on_batch()
    return BatchTimings(sizes=list(sizes), samples_ms=samples)
