"""Continuous batching at scale: the compiled step loop (:mod:`.step_kernel`) fed a window of arrivals at a time.

The interpreted engine (:mod:`.step_engine`) reads every arrival first and keeps each
request until the run ends; this driver keeps a window. Arrivals are loaded a few tens
of thousands at a time, in the order they join the waiting room (with engine overheads
a short prompt overtakes a long one sent just before it: rows wait in a small buffer
until no later arrival can join before them). Whenever the kernel asks for more, the
requests settled since the last time go to the sink in arrival order, the runs and
gaps booked with them, and the window drops its settled head; so a run holds about one
load of requests whatever its length, and a precision stop (the sink's
:meth:`~..results.sinks.Sink.settled`) ends it early. The monitor samples at its
moments as the fleet's does.

It runs what needs no fleet events of its own: no GPU failures, no autoscaler, no
measured step spread (``cycle_jitter``), and the three-term step formula (the extended
model's terms, SPEC section 12, make every decode step of a run its own length; not
ported yet). Prefix caching runs here with KV reserved whole and prompts that share a
system prompt (``--shared-prefix``, :mod:`.prefix_kernel`); conversations and traces' hash
ids, paged KV and routing use the interpreted engine, as do machines without numba
(:func:`compiled_applies`). Both are held to the step-by-step reference request by request.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ...core.dispatch import EPS
from ...core.model import KvPolicy, Routing, ServiceModel
from ...core.prompt_blocks import SharedPrefix
from ...core.records import Outcome, RequestRecords
from ..inputs.arrivals import Arrivals
from ..results.fleet_log import FleetLog
from ..results.sinks import Sink, simulated_outcomes
from ..results.token_gaps import TokenGaps
from .fleet import SAMPLE_KEYS

__all__ = ["CompiledSteps", "compiled_applies", "load_compiled", "shares_only_system_prompts"]

_KV_UNBOUNDED = 1 << 62


def compiled_applies(model: ServiceModel, *, prefixes: bool = False) -> bool:
    """Whether the compiled loop can run this model: numba is installed (the ``fast`` extra) and the fleet never
    changes (no failures, no autoscaler), shares one waiting room (no routing), reserves KV whole and steps take
    their formula's time (no measured spread, no extended step terms). ``prefixes``: the prompts share more than a
    system prompt (conversations, a trace's hash ids), which the compiled cache does not key."""
    return (
        model.routing is Routing.SHARED_QUEUE
        and model.kv_policy is KvPolicy.RESERVE
        and not model.cycle_jitter
        and not (model.prefix_caching and prefixes)
        and not model.context_terms
        and model.faults.mtbf_s is None
        and not model.autoscale.enabled
        and importlib.util.find_spec("numba") is not None
    )


def shares_only_system_prompts(prefixes: np.ndarray | None) -> bool:
    """Whether what these prompts share is at most a system prompt each (what the compiled cache keys)."""
    return prefixes is None or all(p is None or isinstance(p, SharedPrefix) for p in prefixes.tolist())


def load_compiled() -> None:
    """Compile the loop, or load it from numba's cache, now: worker processes forked after this share it instead
    of each importing numba and loading it again (half a second each)."""
    from . import prefix_kernel
    from . import step_kernel as kernel

    state = kernel.new_state(1, 1, 1, 4)
    kv = tuple(prefix_kernel.new_cache(1, 1, caching=False).values())
    kernel.advance(0.0, 0.0, *state.values(), np.zeros(4), np.zeros(kernel.L_SIZE, np.int64), kv)
    kernel.admit_until(0.0, state["rf"], state["ri"], state["queue"], state["iv"], np.zeros(kernel.L_SIZE, np.int64))
    kernel.rebase(0, state["rf"], state["ri"], state["queue"], state["gi"], state["pf"], state["fin"], state["iv"])


class CompiledSteps:
    """One run of continuous batching on a fixed fleet; see the module docstring."""

    LOAD_REQUESTS = 1 << 15  # arrivals loaded at once: a load costs a fold and a rebase of the window
    BOOKED = 1 << 16  # step runs (and gap entries) booked between two flushes

    def __init__(
        self,
        model: ServiceModel,
        gpus: int,
        sink: Sink,
        *,
        horizon_s: float,
        sample_every_s: float,
        load_factor: Callable[[float, float], float],
    ) -> None:
        from . import prefix_kernel  # numba compiles (or loads from its cache) on first use only
        from . import step_kernel as kernel

        self.k, self.pk = kernel, prefix_kernel
        self.model, self.gpus, self.sink = model, gpus, sink
        self.horizon_s, self.every, self.load_factor = horizon_s, sample_every_s, load_factor
        self.state = kernel.new_state(gpus, model.max_num_seqs, self.LOAD_REQUESTS * 2, max(self.BOOKED, 4 * gpus))
        thresholds = model.backpressure.thresholds(gpus, model.max_num_seqs)
        kv = model.kv_cache_tokens if model.kv_cache_tokens is not None else _KV_UNBOUNDED
        self.params = np.array(
            [model.decode_step_ms, model.prefill_ms_per_token, model.decode_ms_per_seq, model.admit_ms_per_request,
             model.idle_wake_ms, model.idle_after_ms]
        )  # fmt: skip
        # Prefix caching: each GPU's blocks (placeholders without it); system prompts numbered as they first come.
        self.caching = model.prefix_caching
        self.cache = prefix_kernel.new_cache(gpus, model.max_num_seqs, self.caching)
        self.state["iv"][prefix_kernel.I_SEG_FREE] = self.cache["seg_pool"].size
        self.state["iv"][prefix_kernel.I_RUN_FREE] = self.cache["run_pool"].size
        self.state["gi"][:, [prefix_kernel.G_LRU_HEAD, prefix_kernel.G_LRU_TAIL]] = -1
        self.groups: dict[int, int] = {}
        blocks = model.kv_cache_blocks
        self.limits = np.array(
            [model.max_num_seqs, kv, model.max_batched_tokens, *thresholds, self.caching, model.kv_block_tokens,
             _KV_UNBOUNDED if math.isinf(blocks) else blocks, math.isinf(blocks),
             prefix_kernel.pool_room(gpus, model.max_num_seqs)],
            np.int64,
        )  # fmt: skip
        self.delayed = bool(model.request_overhead_ms or model.tokenize_ms_per_token)
        self.lag_s = model.output_token_ms / 1000.0
        # The window's own columns beside the kernel's: arrival time, arrival number, handed over yet.
        window = self.state["rf"].shape[1]
        self.sched = np.zeros(window)
        self.seq = np.zeros(window, np.int64)
        self.folded = np.zeros(window, bool)
        self.pending = _Pending()
        self.read = 0  # arrivals read from the chunks
        self.last_read_s = 0.0  # the latest of them: no arrival still to come is earlier
        self.chunks: Iterator[Arrivals] = iter(())
        self.stopped = False
        self.ready_bins = np.zeros(0, np.int64)  # arrivals joining per monitor interval (the monitor's rate)
        self.samples: dict[str, list[float]] = {key: [] for key in SAMPLE_KEYS}

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self, chunks: Iterable[Arrivals]) -> FleetLog:
        k, s = self.k, self.state
        self.chunks = iter(chunks)
        args = self._args()
        t_sample, t_from = 0.0, 0.0
        while True:
            limit = t_sample if t_sample <= self.horizon_s else math.inf
            outcome = k.advance(t_from, limit, *args)
            if outcome == k.NEED_MORE:
                self._load()
                args = self._args()
            elif outcome == k.FLUSH:
                self._flush_booked()
            elif outcome == k.GROW:
                self.pk.grow_pools(self.cache, s["iv"])
                args = self._args()
            elif outcome == k.REACHED:
                while not s["iv"][k.I_EXHAUSTED] and (
                    s["iv"][k.I_N] == 0 or s["rf"][k.RT, s["iv"][k.I_N] - 1] <= t_sample + EPS
                ):
                    self._load()  # the monitor admits every arrival up to its moment: load past it
                args = self._args()
                k.admit_until(t_sample, s["rf"], s["ri"], s["queue"], s["iv"], self.limits)
                self._sample(t_sample)
                t_from = t_sample
                t_sample += self.every
            else:
                break
        self._flush_booked()
        self._fold(final=True)
        samples = {key: np.asarray(values) for key, values in self.samples.items()}
        return FleetLog(np.array([(0.0, self.gpus)], np.float64), samples, [], 0.0)

    def _args(self) -> tuple:
        s = self.state
        kv = tuple(self.cache.values())
        return (s["rf"], s["ri"], s["queue"], s["gi"], s["step_s"], s["pf"], s["fin"], s["heap_end"], s["heap_gpu"],
                s["runs"], s["gaps"], s["iv"], s["fv"], self.params, self.limits, kv)  # fmt: skip

    def _sample(self, t: float) -> None:
        """The fleet monitor's sample at ``t`` (:meth:`~.fleet.Fleet.monitor`): the queue, the fleet, the rate."""
        k = self.k
        every = self.every
        b = round(t / every) - 1  # the interval [t - every, t)
        arrived = int(self.ready_bins[b]) if 0 <= b < self.ready_bins.size else 0
        rate = arrived / every if t > 0 else 0.0
        for key, value in zip(
            SAMPLE_KEYS,
            (t, float(self.state["iv"][k.I_QUEUED]), self.gpus, 0.0, rate, self.load_factor(rate, self.gpus)),
            strict=True,
        ):
            self.samples[key].append(value)

    # -- loading arrivals ----------------------------------------------------------------------------------------

    def _load(self) -> None:
        """Hand over what settled, then load the next arrivals in joining order (or note that none are left)."""
        k, iv = self.k, self.state["iv"]
        self._flush_booked()
        self._fold(final=False)
        loaded = 0
        while loaded < self.LOAD_REQUESTS and not iv[k.I_EXHAUSTED]:
            chunk = None if self.stopped else next(self.chunks, None)
            if chunk is not None:
                self._read(chunk)
            final = chunk is None
            rows = self.pending.take(math.inf if final else self.last_read_s)
            if rows is not None:
                self._append(*rows)
                loaded += rows[0].size
            if final:
                iv[k.I_EXHAUSTED] = 1

    def _read(self, chunk: Arrivals) -> None:
        assert chunk.prompt_tokens is not None and chunk.output_tokens is not None
        m = len(chunk)
        if m == 0:
            return
        ready = chunk.times
        if self.delayed:
            ready = (
                chunk.times + np.asarray(self.model.admission_delay_ms(chunk.prompt_tokens.astype(np.float64))) / 1000.0
            )
        seq = np.arange(self.read, self.read + m, dtype=np.int64)
        group, shared = self._system_prompts(chunk)
        self.pending.add(ready, chunk.times, seq, chunk.tiers, chunk.prompt_tokens, chunk.output_tokens, group, shared)
        self.read += m
        self.last_read_s = float(chunk.times[-1])

    def _system_prompts(self, chunk: Arrivals) -> tuple[np.ndarray, np.ndarray]:
        """Each request's system prompt, numbered as they first came (-1: none), and its blocks in this prompt."""
        m = len(chunk)
        group, shared = np.full(m, -1, np.int64), np.zeros(m, np.int64)
        if not self.caching or chunk.prefixes is None:
            return group, shared
        if not shares_only_system_prompts(chunk.prefixes):
            raise ValueError("the compiled loop caches system prompts only: conversations and traces' hash ids "
                             "run in the interpreted engine")  # fmt: skip
        prefixes = chunk.prefixes.tolist()
        has = np.fromiter((p is not None for p in prefixes), bool, count=m)
        tokens = np.fromiter((p.tokens if p is not None else 0 for p in prefixes), np.int64, count=m)
        given = np.fromiter((p.group if p is not None else -1 for p in prefixes), np.int64, count=m)
        seen, which = np.unique(given[has], return_inverse=True)
        for g in seen.tolist():
            self.groups.setdefault(g, len(self.groups))
        group[has] = np.array([self.groups[g] for g in seen.tolist()], np.int64)[which]
        shared[has] = np.minimum(tokens[has], chunk.prompt_tokens[has]) // self.model.kv_block_tokens
        self.pk.fit_groups(self.cache, len(self.groups), int(shared.max(initial=0)))
        return group, shared

    def _append(self, ready, sched, seq, tiers, prompt, output, group, shared) -> None:
        k, s = self.k, self.state
        n, m = int(s["iv"][k.I_N]), ready.size
        if n + m > s["rf"].shape[1]:
            self._grow(max(2 * s["rf"].shape[1], n + m))
        rf, ri = s["rf"], s["ri"]
        rf[k.RT, n : n + m] = ready
        rf[k.FIRST, n : n + m] = np.nan
        rf[k.DONE, n : n + m] = np.nan
        ri[k.TIER, n : n + m] = tiers
        ri[k.PROMPT, n : n + m] = prompt
        ri[k.OUTPUT, n : n + m] = output
        ri[k.STATUS, n : n + m] = k.WAITING
        ri[k.FILL, n : n + m] = prompt
        ri[k.GROUP, n : n + m] = group
        ri[k.SHARED_N, n : n + m] = shared
        ri[k.CACHED, n : n + m] = 0
        self.sched[n : n + m], self.seq[n : n + m], self.folded[n : n + m] = sched, seq, False
        s["iv"][k.I_N] = n + m
        bins = (ready / self.every).astype(np.int64)
        counts = np.bincount(bins, minlength=self.ready_bins.size)
        counts[: self.ready_bins.size] += self.ready_bins
        self.ready_bins = counts

    def _grow(self, window: int) -> None:
        s = self.state
        for name, fill in (("rf", np.nan), ("ri", 0), ("queue", 0)):
            old = s[name]
            grown = np.full((old.shape[0], window), fill, dtype=old.dtype)
            grown[:, : old.shape[1]] = old
            s[name] = grown
        for name in ("sched", "seq", "folded"):
            old = getattr(self, name)
            grown = np.zeros(window, dtype=old.dtype)
            grown[: old.size] = old
            setattr(self, name, grown)

    # -- handing over ----------------------------------------------------------------------------------------------

    def _flush_booked(self) -> None:
        """The step runs and inter-token gaps booked since the last flush, to the sink."""
        k, s = self.k, self.state
        iv = s["iv"]
        runs, gaps = s["runs"][: iv[k.I_RUNS]], s["gaps"][: iv[k.I_GAPS]]
        self.sink.fold_batches(runs[:, 0].copy(), runs[:, 1].copy(), runs[:, 2].astype(np.int64))
        self.sink.fold_gaps(TokenGaps(gaps[:, 0] * 1000.0 + self.model.output_token_ms, gaps[:, 1:4].astype(np.int64),
                                      gaps[:, 4].copy()))  # fmt: skip
        iv[k.I_RUNS] = iv[k.I_GAPS] = 0

    def _fold(self, *, final: bool) -> None:
        """Hand the settled requests over in arrival order, up to the first one still open; drop the window's
        handed-over head."""
        k, s = self.k, self.state
        n = int(s["iv"][k.I_N])
        rf, ri = s["rf"][:, :n], s["ri"][:, :n]
        status = ri[k.STATUS]
        open_ = ~self.folded[:n] & (status == k.WAITING) & np.isnan(rf[k.DONE])
        first_open = self.read if final else min(self.read, self.pending.first_seq())
        if not final and open_.any():
            first_open = min(first_open, int(self.seq[:n][open_].min()))
        take = np.flatnonzero(~self.folded[:n] & (self.seq[:n] < first_open))
        if take.size:
            take = take[np.argsort(self.seq[take], kind="stable")]
            self.sink.fold(self._records(take, final=final))
            self.folded[take] = True
        if not final:  # every arrival before the earliest one not handed over (window, buffer, unread) is folded
            until = math.inf if s["iv"][k.I_EXHAUSTED] else self.last_read_s
            unfolded = ~self.folded[:n]
            if unfolded.any():
                until = min(until, float(self.sched[:n][unfolded].min()))
            if self.sink.settled(min(until, self.pending.first_time())):
                self.stopped = True  # a precision stop: no more arrivals; the window's drain
        cut = n if self.folded[:n].all() else int(np.argmin(self.folded[:n]))
        if cut and not final:
            k.rebase(cut, s["rf"], s["ri"], s["queue"], s["gi"], s["pf"], s["fin"], s["iv"])
            for column in (self.sched, self.seq, self.folded):
                column[: n - cut] = column[cut:n]

    def _records(self, rows: np.ndarray, *, final: bool) -> RequestRecords:
        k, s = self.k, self.state
        rf, ri = s["rf"], s["ri"]
        status = ri[k.STATUS, rows]
        output = ri[k.OUTPUT, rows].astype(np.int32)
        finished, first = rf[k.DONE, rows].copy(), rf[k.FIRST, rows] + self.lag_s
        outcome = simulated_outcomes(status != k.SHED, np.zeros(rows.size, bool), finished, final=final)
        outcome[status == k.REFUSED] = Outcome.CLIENT_ERROR  # longer than the whole KV cache
        served = outcome == Outcome.OK
        finished[served] += self.lag_s * output[served]
        return RequestRecords(
            tier=ri[k.TIER, rows].astype(np.int8),
            scheduled=self.sched[rows],
            finished=finished,
            outcome=outcome,
            first_token=first,
            prompt_tokens=ri[k.PROMPT, rows].astype(np.int32),
            output_tokens=output,
            cached_tokens=ri[k.CACHED, rows].copy() if self.caching else None,
        )


class _Pending:
    """Arrivals read but not yet joined: released in joining order once no later arrival can join before them."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, *columns: np.ndarray) -> None:
        self.parts.append(columns)

    def take(self, through_s: float) -> tuple[np.ndarray, ...] | None:
        """Rows joining at or before ``through_s``, by (joining time, arrival number); the rest stay."""
        if not self.parts:
            return None
        columns = (
            self.parts[0] if len(self.parts) == 1 else tuple(np.concatenate(c) for c in zip(*self.parts, strict=True))
        )
        ready, seq = columns[0], columns[2]
        order = np.lexsort((seq, ready))
        cut = int(np.searchsorted(ready[order], through_s, side="right"))
        now, later = order[:cut], order[cut:]
        self.parts = [tuple(c[later] for c in columns)] if later.size else []
        return tuple(c[now] for c in columns) if cut else None

    def first_seq(self) -> int:
        return min((int(p[2].min()) for p in self.parts if p[2].size), default=1 << 62)

    def first_time(self) -> float:
        return min((float(p[1].min()) for p in self.parts if p[1].size), default=math.inf)
