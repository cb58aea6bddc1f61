"""Measuring a backend's batch latency against batch size, as the server's GPU worker sees it.

Two sources. Synthetic (:func:`measure_batches`): the backend is driven directly (no
HTTP, no queueing), each measurement one ``run_batch`` call, the same call a GPU worker
makes, so the profile holds exactly the time a batch occupies its GPU. Sizes are
visited in a shuffled order on every repetition, so a slow drift of the machine does
not masquerade as a size effect, and warm-up batches (first-call compilation, cache
allocation) are run and discarded. From traffic (:func:`served_batch_timings`): the
batches a running server actually served to its clients, read from its internal API;
nothing is added to its load, and the times are those under its real load, which on a
busy machine differ from batches run alone.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from ..server.backends.base import Backend, BackendError
from ..server.backends.http_client import request_json
from .profile import LinearFit, fit_batch_latency, jitter_quantiles

__all__ = ["MIN_TRAFFIC_SAMPLES", "BatchTimings", "TooFewSizesError", "measure_batches", "served_batch_timings"]

MIN_TRAFFIC_SAMPLES = 5  # batches of one size needed before its median enters the fit


@dataclass
class BatchTimings:
    sizes: list[int]
    samples_ms: dict[int, list[float]]

    def median_ms(self) -> list[float]:
        return [float(np.median(self.samples_ms[s])) for s in self.sizes]

    def p95_ms(self) -> list[float]:
        return [float(np.percentile(self.samples_ms[s], 95)) for s in self.sizes]

    def fit(self) -> tuple[LinearFit, list[float]]:
        """The profile's line through the per-size medians, and the spread around it (cycle_jitter)."""
        line = fit_batch_latency(self.sizes, self.median_ms())
        return line, jitter_quantiles(line, self.samples_ms)


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


class TooFewSizesError(BackendError):
    """The traffic in the window does not hold two batch sizes seen often enough to fit a line."""


async def served_batch_timings(internal_url: str, window_s: float, timeout_s: float = 30.0) -> BatchTimings:
    """The batch times of the client traffic a server served in its last ``window_s`` seconds, by size.

    Sizes seen fewer than ``MIN_TRAFFIC_SAMPLES`` times are left out: one odd batch
    would weigh as much in the fit as a size seen a thousand times.
    """
    url = f"{internal_url.rstrip('/')}/internal/batches?window_s={window_s:g}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        data = await request_json(session, "GET", url)
    by_size: dict[int, list[float]] = defaultdict(list)
    try:
        for _ended_at, size, ms in data["batches"]:
            by_size[int(size)].append(float(ms))
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(f"{url} sent no batch log (ended_at, size, ms): {err!r}") from None
    sizes = sorted(s for s, v in by_size.items() if len(v) >= MIN_TRAFFIC_SAMPLES)
    if len(sizes) < 2:
        counts = [f"{len(v)} of size {s}" for s, v in sorted(by_size.items(), key=lambda kv: -len(kv[1]))]
        seen = ", ".join(counts[:6]) + (", ..." if len(counts) > 6 else "") if counts else "none"
        raise TooFewSizesError(
            f"the last {window_s:g} s of traffic give {len(sizes)} batch size(s) with >= {MIN_TRAFFIC_SAMPLES} "
            f"batches (seen: {seen}); a line needs two"
        )
    return BatchTimings(sizes=sizes, samples_ms={s: by_size[s] for s in sizes})
