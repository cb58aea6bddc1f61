"""A run's figures folded in as its requests settle: counts and log histograms per time slice and tier.

The streaming engine hands every request over once nothing can change it any more
(answered, shed or failed) and forgets it; what the summary needs is kept here instead:
per slice of the measured window and per tier, request counts and log-bucket histograms
(:class:`~infer_plan.core.histogram.LogHistogram`'s buckets) of E2E, TTFT, TPOT and ITL.
Memory is the slices times the buckets, whatever the request count.

The slices serve a second purpose: they are the batches of the batch-means method that
``--precision`` stops on. Each slice's P95 is one observation; their spread gives a
Student-t interval for the run's P95, and a run can stop at a slice edge once every
percentile in play is known to within the precision asked for (:meth:`Tally.settled`).
The measured window is then ``[warmup, warmup + k slices)``: every request that arrived
in it has been folded, every one after it is ignored, so the figures are those of a
shorter run, not a truncated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...core.histogram import N_BUCKETS, LogHistogram, buckets_of, row_percentiles
from ...core.model import ServiceModel
from ...core.records import Outcome, RequestRecords
from ...core.schema import MetricInterval, PrecisionReport
from ...core.slos import good_requests
from ...core.stats import latency_stats, token_stats
from ...core.tiers import Tier
from .token_gaps import TokenGaps

__all__ = ["Precision", "Tally", "Watch", "student_t"]

_N_TIERS = len(Tier)
_COUNTS = (
    "requests", "completed", "rejected", "failed", "good", "output_tokens", "prompt_tokens", "cached_tokens",
    "preemptions",
)  # fmt: skip
MAX_SLICES = 128  # a long run gets longer slices, so the per-slice figures stay a few kilobytes
MIN_SLICES = 10  # fewer slice P95s make no interval worth the name


@dataclass(frozen=True)
class Watch:
    """One percentile a precision stop waits for: a metric (e2e, ttft, itl, tpot) overall or for one tier."""

    metric: str
    tier: int | None = None

    @property
    def name(self) -> str:
        base = "p95" if self.metric == "e2e" else f"{self.metric}_p95"
        return base if self.tier is None else f"{base}:{Tier(self.tier).label}"


@dataclass(frozen=True)
class Precision:
    """Stop when every watched P95's 95% interval is within ``relative`` of it, after ``min_s`` measured."""

    relative: float
    min_s: float
    watch: tuple[Watch, ...] = (Watch("e2e"),)


def slice_seconds(duration_s: float) -> float:
    """One slice: a second, longer for long runs (at most MAX_SLICES of them)."""
    return max(1.0, duration_s / MAX_SLICES)


class Tally:
    """The measured window's figures, folded in request slice by request slice (see the module docstring)."""

    def __init__(
        self,
        model: ServiceModel,
        warmup_s: float,
        duration_s: float,
        *,
        tokens: bool,
        precision: Precision | None = None,
        sample_every_s: float | None = None,
    ) -> None:
        self.w0, self.w1 = warmup_s, warmup_s + duration_s
        self.slice_s = slice_seconds(duration_s)
        self.n_slices = max(1, math.ceil(duration_s / self.slice_s - 1e-9))
        self.edges = np.minimum(self.w0 + self.slice_s * np.arange(self.n_slices + 1), self.w1)
        self.tokens = tokens
        self.precision = precision
        self.slos = model.slos
        shape = (self.n_slices, _N_TIERS)
        self.counts = {name: np.zeros(shape, np.int64) for name in _COUNTS}
        self.caching = False  # set by the first requests that carry prefix-cache hits
        self.paged = False  # set by the first requests that carry preemption counts (paged KV)
        metrics = ("e2e", "ttft", "tpot", "itl") if tokens else ("e2e",)
        # Histograms of the slices still filling, by slice; a slice whose requests have all been folded is
        # closed: its P95s are noted for the precision stop and its counts merge into ``closed``. So memory holds
        # the two or three open slices and the totals, however long the run.
        self.open: dict[str, dict[int, np.ndarray]] = {m: {} for m in metrics}
        self.closed = {m: np.zeros((_N_TIERS, N_BUCKETS), np.int64) for m in metrics}
        self.closed_slices = 0
        self.slice_p95: dict[Watch, list[float]] = {w: [] for w in (precision.watch if precision else ())}
        self.sum_ms = {m: np.zeros(shape) for m in metrics}
        self.max_ms = {m: np.full(shape, -np.inf) for m in metrics}
        self.completions = np.zeros(self.n_slices, np.int64)  # OK answers finishing in each slice
        self.busy_s = np.zeros(self.n_slices)
        self.batches = np.zeros(self.n_slices, np.int64)  # batches (continuous: steps) starting in each slice
        self.batch_items = np.zeros(self.n_slices, np.int64)
        self.all_requests = 0  # every request folded, window or not: the run's mean lengths
        self.prompt_sum = 0
        self.output_sum = 0
        self.cached_sum = 0  # prompt tokens found in the prefix cache, every request folded
        self.sample_every_s = sample_every_s
        self.tokens_by_sample = np.zeros(0)  # output tokens finishing in each monitor interval
        self.stopped_at: int | None = None  # slices measured when a precision stop ended the run
        self.report: PrecisionReport | None = None

    # -- folding ------------------------------------------------------------------------

    def _slices(self, times: np.ndarray) -> np.ndarray:
        """Slice index of each time; -1 outside the window."""
        index = np.searchsorted(self.edges, times, side="right") - 1
        return np.where((times >= self.w0) & (times < self.w1), index, -1)

    def fold(self, rec: RequestRecords) -> None:
        """Settled requests, in arrival order."""
        if len(rec) == 0:
            return
        self.all_requests += len(rec)
        if rec.prompt_tokens is not None and rec.output_tokens is not None:
            self.prompt_sum += int(rec.prompt_tokens.sum(dtype=np.int64))
            self.output_sum += int(rec.output_tokens.sum(dtype=np.int64))
        if rec.cached_tokens is not None:
            self.cached_sum += int(rec.cached_tokens.sum(dtype=np.int64))
        ok = rec.outcome == Outcome.OK
        done = self._slices(rec.finished[ok])
        self.completions += np.bincount(done[done >= 0], minlength=self.n_slices)
        if self.sample_every_s and rec.output_tokens is not None:
            self._tokens_over_time(rec.finished[ok], rec.output_tokens[ok])
        bounds = np.searchsorted(rec.scheduled, self.edges)
        for j in range(self.n_slices):
            if bounds[j + 1] > bounds[j]:
                self._fold_slice(j, rec.take(slice(int(bounds[j]), int(bounds[j + 1]))))

    def _fold_slice(self, j: int, rec: RequestRecords) -> None:
        tier = rec.tier.astype(np.int64)
        ok = rec.outcome == Outcome.OK
        counts = self.counts
        counts["requests"][j] += np.bincount(tier, minlength=_N_TIERS)
        counts["completed"][j] += np.bincount(tier[ok], minlength=_N_TIERS)
        counts["rejected"][j] += np.bincount(tier[rec.outcome == Outcome.REJECTED], minlength=_N_TIERS)
        counts["failed"][j] += np.bincount(tier[rec.outcome == Outcome.FAILED], minlength=_N_TIERS)
        served = tier[ok]
        e2e = rec.latency_ms[ok]
        self._add("e2e", j, served, e2e)
        if rec.first_token is None or not self.tokens:
            return
        assert rec.output_tokens is not None
        output = rec.output_tokens[ok].astype(np.int64)
        ttft = (rec.first_token[ok] - rec.scheduled[ok]) * 1000.0
        several = output > 1
        tpot = (e2e[several] - ttft[several]) / (output[several] - 1)
        self._add("ttft", j, served, ttft)
        self._add("tpot", j, served[several], tpot)
        counts["output_tokens"][j] += np.bincount(served, weights=output, minlength=_N_TIERS).astype(np.int64)
        good = good_requests(self.slos, e2e, ttft, output)
        counts["good"][j] += np.bincount(served[good], minlength=_N_TIERS)
        if rec.preemptions is not None:
            self.paged = True
            counts["preemptions"][j] += np.bincount(served, weights=rec.preemptions[ok], minlength=_N_TIERS).astype(
                np.int64
            )
        if rec.cached_tokens is not None and rec.prompt_tokens is not None:
            self.caching = True
            counts["prompt_tokens"][j] += np.bincount(served, weights=rec.prompt_tokens[ok], minlength=_N_TIERS).astype(
                np.int64
            )
            counts["cached_tokens"][j] += np.bincount(served, weights=rec.cached_tokens[ok], minlength=_N_TIERS).astype(
                np.int64
            )

    def _add(
        self, metric: str, j: int, tier: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None
    ) -> None:
        if values.size == 0:
            return
        keys = tier * N_BUCKETS + buckets_of(values)
        if j < self.closed_slices:  # a straggler of a closed slice (not expected: folds come in arrival order)
            raise RuntimeError(f"slice {j} is already closed")
        if j not in self.open[metric]:
            self.open[metric][j] = np.zeros((_N_TIERS, N_BUCKETS), np.int64)
        self.open[metric][j] += (
            np.bincount(keys, weights=weights, minlength=_N_TIERS * N_BUCKETS)
            .reshape(_N_TIERS, N_BUCKETS)
            .astype(np.int64)
        )
        self.sum_ms[metric][j] += np.bincount(tier, weights=values if weights is None else values * weights,
                                              minlength=_N_TIERS)  # fmt: skip
        np.maximum.at(self.max_ms[metric][j], tier, values)

    def fold_gaps(self, gaps: TokenGaps) -> None:
        """Inter-token gaps (grouped by the engines), counted in the slice they ended in."""
        if not self.tokens or gaps.gaps_ms.size == 0:
            return
        where = self._slices(gaps.at_s)
        for j in np.unique(where[where >= 0]).tolist():
            mine = where == j
            for tier in range(_N_TIERS):
                weights = gaps.counts[mine, tier]
                keep = weights > 0
                if keep.any():
                    self._add("itl", j, np.full(int(keep.sum()), tier), gaps.gaps_ms[mine][keep], weights[keep])

    def fold_batches(self, start: np.ndarray, end: np.ndarray, size: np.ndarray) -> None:
        """Batches (continuous batching: step runs) booked since the last fold: GPU busy time and sizes per slice."""
        if start.size == 0:
            return
        first = self._slices(start)
        inside = first >= 0
        self.batches += np.bincount(first[inside], minlength=self.n_slices)
        self.batch_items += np.bincount(first[inside], weights=size[inside], minlength=self.n_slices).astype(np.int64)
        lo = max(0, int(np.searchsorted(self.edges, start.min(), side="right")) - 1)
        hi = min(self.n_slices, int(np.searchsorted(self.edges, end.max(), side="right")))
        for j in range(lo, hi):
            overlap = np.minimum(end, self.edges[j + 1]) - np.maximum(start, self.edges[j])
            self.busy_s[j] += float(np.clip(overlap, 0.0, None).sum())

    def _tokens_over_time(self, finished: np.ndarray, output: np.ndarray) -> None:
        assert self.sample_every_s is not None
        bins = (finished / self.sample_every_s).astype(np.int64)
        if bins.size == 0:
            return
        grown = np.bincount(bins, weights=output, minlength=self.tokens_by_sample.size)
        grown[: self.tokens_by_sample.size] += self.tokens_by_sample
        self.tokens_by_sample = grown

    # -- the precision stop -------------------------------------------------------------

    def settled(self, folded_until_s: float) -> bool:
        """Close the slices complete by now; whether a precision stop may end the run.

        Every request that arrived before ``folded_until_s`` has been folded.
        """
        complete = min(self.n_slices, int(np.searchsorted(self.edges, folded_until_s, side="right")) - 1)
        if self.precision is None or self.stopped_at is not None:
            self._close_until(complete)
            return False
        # One slice at a time: the stop is the first slice edge where the precision is met, however many
        # slices one fold completes (a load may hold many seconds of a slow rate).
        for k in range(self.closed_slices + 1, complete + 1):
            self._close_until(k)
            if k < MIN_SLICES or self.edges[k] - self.w0 < self.precision.min_s - 1e-9:
                continue
            report = self._precision_report(k)
            if report.met:
                self.stopped_at, self.report = k, report
                return True
        return False

    def _close_until(self, k: int) -> None:
        if self.stopped_at is not None:
            return  # the window is final; later slices are not part of it
        for j in range(self.closed_slices, k):
            rows = {m: self.open[m].pop(j, None) for m in self.open}
            for watch, p95s in self.slice_p95.items():
                row = rows[watch.metric]
                counts = None if row is None else (row.sum(axis=0) if watch.tier is None else row[watch.tier])
                p95s.append(float(row_percentiles(counts[None, :], 95.0)[0]) if counts is not None else math.nan)
            for m, row in rows.items():
                if row is not None:
                    self.closed[m] += row
        self.closed_slices = max(self.closed_slices, k)

    def finish(self) -> int:
        """Close the run: the number of slices measured, and the precision report when one was asked for."""
        if self.stopped_at is None:
            self._close_until(self.n_slices)
            self.stopped_at = self.n_slices
            if self.precision is not None:
                self.report = self._precision_report(self.n_slices)
        return self.stopped_at

    def _precision_report(self, k: int) -> PrecisionReport:
        assert self.precision is not None
        intervals = {}
        widest = 0.0
        for watch in self.precision.watch:
            value, half = self._interval(watch, k)
            if value is None:
                continue
            intervals[watch.name] = MetricInterval(value_ms=value, low_ms=value - half, high_ms=value + half)
            widest = max(widest, half / value if value > 0 else (0.0 if half == 0 else math.inf))
        met = bool(intervals) and widest <= self.precision.relative
        return PrecisionReport(
            target=self.precision.relative, reached=widest if intervals else None, met=met,
            measured_s=float(self.edges[k] - self.w0), slices=k, intervals=intervals,
        )  # fmt: skip

    def _interval(self, watch: Watch, k: int) -> tuple[float | None, float]:
        """P95 of the k closed slices and the half-width of its 95% batch-means interval (inf if too few slices)."""
        closed = self.closed[watch.metric]
        total = _histogram(closed.sum(axis=0) if watch.tier is None else closed[watch.tier])
        if total.count == 0:
            return None, math.inf
        value = float(total.percentiles(np.array([95.0]))[0])
        p95s = np.array(self.slice_p95[watch][:k])
        p95s = p95s[~np.isnan(p95s)]
        if p95s.size < MIN_SLICES:
            return value, math.inf
        t = student_t(0.975, p95s.size - 1)
        return value, t * float(p95s.std(ddof=1)) / math.sqrt(p95s.size)

    # -- reading the figures back -------------------------------------------------------

    @property
    def kept(self) -> int:
        """Slices in the measured window: up to a precision stop, else all."""
        return self.stopped_at if self.stopped_at is not None else self.n_slices

    @property
    def measured(self) -> tuple[float, float]:
        """The window measured: [warmup, warmup + the slices kept)."""
        return self.w0, float(self.edges[self.kept])

    def count(self, name: str, tier: int | None = None) -> int:
        column = self.counts[name][: self.kept]
        return int(column.sum() if tier is None else column[:, tier].sum())

    def histogram(self, metric: str, tier: int | None = None) -> LogHistogram:
        k = self.kept
        closed, sums, peaks = self.closed[metric], self.sum_ms[metric][:k], self.max_ms[metric][:k]
        if tier is not None:
            sums, peaks = sums[:, tier], peaks[:, tier]
        hist = _histogram(closed.sum(axis=0) if tier is None else closed[tier])
        hist.total_ms, hist.max_ms = float(sums.sum()), float(peaks.max(initial=-np.inf))
        return hist

    def latency_stats(self, tier: int | None, *, cdf: bool = True) -> dict[str, object]:
        return latency_stats(self.histogram("e2e", tier), cdf=cdf).model_dump()

    def token_stats(self, tier: int | None, duration_s: float) -> dict[str, object]:
        if not self.tokens:
            return {}
        return token_stats(
            ttft_ms=self.histogram("ttft", tier), itl_ms=self.histogram("itl", tier),
            tpot_ms=self.histogram("tpot", tier), output_tokens=self.count("output_tokens", tier),
            good=self.count("good", tier), duration_s=duration_s,
            prompt_and_cached=(self.count("prompt_tokens", tier), self.count("cached_tokens", tier))
            if self.caching else None,
            preemptions=self.count("preemptions", tier) if self.paged else None,
        ).model_dump()  # fmt: skip

    def window_sums(self) -> tuple[float, int, int, int]:
        """GPU busy seconds, completions, batches and their items within the measured window."""
        k = self.kept
        return (
            float(self.busy_s[:k].sum()),
            int(self.completions[:k].sum()),
            int(self.batches[:k].sum()),
            int(self.batch_items[:k].sum()),
        )


def student_t(q: float, df: int) -> float:
    """Student's t quantile. scipy loads on first use only: it costs half a second that most commands never need."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def _histogram(counts: np.ndarray) -> LogHistogram:
    hist = LogHistogram()
    hist.counts = counts.astype(np.int64)
    hist.max_ms = math.inf  # percentiles below 100 are not clipped when the exact max is not at hand
    return hist
