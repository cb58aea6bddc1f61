"""Measuring a backend's batch latency by batch size (and prompt and output length), as a GPU worker sees it.

Two sources. Synthetic (:func:`measure_batches`): the backend is driven directly (no
HTTP, no queueing), each measurement one ``run_batch`` call, the same call a GPU worker
makes, so the profile holds exactly the time a batch occupies its GPU. Cells are
visited in a shuffled order on every repetition, so a slow drift of the machine does
not masquerade as a size effect, and warm-up batches (first-call compilation, cache
allocation) are run and discarded. A token cell's requests carry prompts of exactly
``prompt_tokens`` random token ids (random, so an engine's prefix cache cannot skip
their prefill) and ask for exactly ``output_tokens`` tokens, end of sequence ignored.
From traffic (:func:`served_batch_timings`): the batches a running server actually
served to its clients, read from its internal API; nothing is added to its load, and
the times are those under its real load, which on a busy machine differ from batches
run alone.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from ..server.backends.base import Backend, BackendError, Generate
from ..server.backends.http_client import request_json
from .profile import Cell, LinearFit, PhaseSplit, fit_batch_latency, jitter_quantiles

__all__ = ["MIN_TRAFFIC_SAMPLES", "BatchTimings", "TooFewSizesError", "measure_batches", "served_batch_timings"]

MIN_TRAFFIC_SAMPLES = 5  # batches of one size needed before its median enters the fit
PROMPT_IDS = range(100, 1000)  # token ids of calibration prompts: inside any real vocabulary (the tiny model's is 2000)


@dataclass
class BatchTimings:
    samples_ms: dict[Cell, list[float]]  # in the order the cells were asked for
    phases_ms: dict[Cell, list[dict[str, float]]] | None = None  # per batch, from a backend that times its phases

    @property
    def cells(self) -> list[Cell]:
        return list(self.samples_ms)

    @property
    def sizes(self) -> list[int]:
        return sorted({c.size for c in self.samples_ms})

    def median_ms(self) -> list[float]:
        return [float(np.median(v)) for v in self.samples_ms.values()]

    def p95_ms(self) -> list[float]:
        return [float(np.percentile(v, 95)) for v in self.samples_ms.values()]

    def fit(self) -> tuple[LinearFit, list[float]]:
        """The profile's costs fitted to the per-cell medians, and the spread around them (cycle_jitter)."""
        fit = fit_batch_latency(self.cells, self.median_ms())
        return fit, jitter_quantiles(fit, self.samples_ms)

    def phase_medians(self) -> dict[str, list[float]] | None:
        """Each phase's median per cell (None: the backend times no phases)."""
        if not self.phases_ms or not all(self.phases_ms.values()):
            return None
        names = list(next(iter(self.phases_ms.values()))[0])
        return {p: [float(np.median([b[p] for b in batches])) for batches in self.phases_ms.values()] for p in names}

    def phase_split(self, fit: LinearFit) -> PhaseSplit | None:
        """The fitted fixed cost split as the service model splits it: PCIe in, kernel, PCIe out.

        Each phase is fitted against batch size on its own; its intercept is that phase's
        fixed cost. PCIe in and out take theirs; the kernel the rest of the whole batch's
        fixed cost, so the three add up to what was measured end to end.
        """
        medians = self.phase_medians()
        if medians is None:
            return None
        sizes = np.array([c.size for c in self.phases_ms or {}], dtype=float)
        intercept = {p: max(0.0, float(np.polyfit(sizes, v, 1)[1])) for p, v in medians.items()}
        pcie_in, pcie_out = intercept.get("pcie_in_ms", 0.0), intercept.get("pcie_out_ms", 0.0)
        return PhaseSplit(pcie_in, max(0.0, fit.fixed_ms - pcie_in - pcie_out), pcie_out)


async def measure_batches(
    backend: Backend,
    cells: list[Cell],
    repetitions: int,
    warmup: int,
    *,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> BatchTimings:
    """Time ``repetitions`` batches of every cell (after ``warmup`` discarded ones of the largest)."""
    rng = random.Random(seed)
    counter = 0

    def batch(cell: Cell) -> list[Generate]:
        nonlocal counter
        counter += 1
        if not cell.tokens:
            text = f"calibration prompt {counter}-{{}}: the quick brown fox jumps over the lazy dog"
            return [Generate(text.format(i)) for i in range(cell.size)]
        p = cell.prompt_tokens or 0
        ids = rng.choices(PROMPT_IDS, k=cell.size * p)
        return [Generate(ids[i * p : (i + 1) * p], cell.output_tokens, ignore_eos=True) for i in range(cell.size)]

    largest = max(cells, key=lambda c: c.size * ((c.prompt_tokens or 0) + (c.output_tokens or 1)))
    for _ in range(warmup):
        await backend.run_batch(batch(largest), 0)
        if on_batch:
            on_batch()
    samples: dict[Cell, list[float]] = {c: [] for c in cells}
    phases: dict[Cell, list[dict[str, float]]] = {}
    for _ in range(repetitions):
        order = list(cells)
        rng.shuffle(order)
        for cell in order:
            requests = batch(cell)
            started = time.perf_counter()
            outputs = await backend.run_batch(requests, 0)
            samples[cell].append((time.perf_counter() - started) * 1000.0)
            if (timed := backend.batch_phases(0)) is not None:
                phases.setdefault(cell, []).append(timed)
            if len(outputs) != cell.size:
                raise BackendError(f"backend returned {len(outputs)} outputs for a batch of {cell.size}")
            if on_batch:
                on_batch()
    return BatchTimings(samples, {c: phases[c] for c in cells} if len(phases) == len(cells) else None)


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
        for row in data["batches"]:
            by_size[int(row[1])].append(float(row[2]))
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
    return BatchTimings({Cell(s): by_size[s] for s in sizes})
