"""Continuous batching, step by step: how vLLM, SGLang and TGI run (SPEC section 10).

Each GPU runs *steps*. A step holds the GPU's running sequences: each either prefills
(part of) its prompt or decodes, and each emits one token at the step's end (a prompt's
last prefill chunk emits its first token). A step lasts ``decode_step_ms +
prefill_ms_per_token * (prompt tokens prefilled) + decode_ms_per_seq * (sequences in
it) + admit_ms_per_request * (requests admitted for it)``. Between steps the GPU
admits waiting requests by tier, FIFO within a tier, while it runs fewer than
``max_num_seqs`` and the running sequences' prompt and output tokens fit
``kv_cache_tokens`` (reserved whole at admission, so a sequence is never evicted; the
first request that does not fit blocks the ones behind it); a step prefills at most
``max_batched_tokens`` prompt tokens, so a longer prompt is prefilled in chunks. A
finished sequence leaves at once; a request arriving during a step waits for its end.
With ``prefix_caching`` each GPU counts its KV in blocks and keeps finished prompts'
blocks cached (:class:`~infer_plan.core.prefix_cache.PrefixCache`, SPEC section 13): a
request prefills only what follows its leading cached blocks. With ``kv_policy = "paged"``
a sequence holds blocks for its tokens so far (prompt, answer, the token its next step
emits): before each step the decoding sequences, in admission order, take a block when
they need one, and when none is free the GPU's running sequence of the lowest tier,
latest arrival, is preempted (its blocks freed, back to the head of its tier's queue,
prompt and answer so far recomputed when admitted again; its client sees one long gap).
Paged steps run one at a time, not in runs. Both together: a sequence shares its leading
resident blocks and takes its own as it grows, a cached block is evicted for it before
anyone is preempted, and a preempted sequence's full blocks stay cached for its recompute.

Speed: a GPU does a hundred steps a second and most of them admit or finish someone,
so a step must cost microseconds. Steps are therefore not SimPy events: the engine runs
them in its own loop, in time order across GPUs, and hands control to SimPy only when
a fleet event (a failure, the autoscaler, the monitor) comes first. Nothing is done per
token: a decoding sequence only needs the step of its last token (a heap per GPU), a
run of identical decode steps with nobody to admit or finish is one event, and the gaps
between tokens are kept as (gap, count per tier) per step.
:mod:`infer_plan.sim.references.step_reference` is the slow, obviously-correct model the tests hold
this one to, request by request.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

from ...core.dispatch import EPS
from ...core.jitter import StepJitter
from ...core.model import KvPolicy, Routing, ServiceModel
from ...core.prefix_cache import PrefixCache, blocks_needed, cached_tokens
from ...core.prompt_blocks import answer_segment, prompt_segments, with_answer
from ...core.routing import choose_replica
from ..results.token_gaps import TokenGaps
from .fleet import Fleet, GpuState
from .waiting import ArrivalQueue, RoutedArrivalQueue, SessionPlan, session_queue

__all__ = ["StepEngine"]


@dataclass(slots=True)
class _Gpu:
    """One GPU's sequences and the step (or run of identical decode steps) it is in."""

    accepting: bool = True  # serving and not released: admits new sequences
    busy: bool = False
    generation: int = 0  # bumped when its step is void (a failure), so a stale heap entry is skipped
    steps_done: int = 0
    kv: int = 0  # reserved prompt + output tokens of the running sequences
    running: int = 0
    prefilling: list[list[int]] = field(default_factory=list)  # [request, prompt tokens left], admission order
    finishing: list[tuple[int, int]] = field(default_factory=list)  # heap of (step of its last token, request)
    decoding: list[int] = field(default_factory=lambda: [0, 0, 0])  # decoding sequences per tier
    n_decoding: int = 0
    step_s: float = 0.0
    steps: int = 0
    jittered: np.ndarray | None = None  # with a measured spread: each step's own length (s) in the current run
    chunks: list[int] = field(default_factory=list)  # prompt tokens each prefilling sequence gets this step
    # Extended step model: the decoding sequences' context at step s is kv_base + n_decoding x s (each holds
    # prompt + 1 - the step it joined at, plus one token a step); kept only when decode_ms_per_kv_token is set.
    kv_base: int = 0
    cache: PrefixCache | None = None  # with prefix caching: its KV blocks, cached prefixes included
    order: list[int] = field(default_factory=list)  # paged KV: its running sequences in admission order
    last_end: float = -math.inf  # when its last step ended (idle_wake_ms: a new GPU has been idle forever)


class StepEngine:
    """Continuous batching over a fixed set of arrivals; see the module docstring."""

    def __init__(
        self,
        env: simpy.Environment,
        model: ServiceModel,
        times: np.ndarray,
        tiers: np.ndarray,
        prompt: np.ndarray,
        output: np.ndarray,
        gpus: int,
        rng: np.random.Generator,
        *,
        horizon_s: float,
        sample_every_s: float,
        load_factor: Callable[[float, float], float],
        jitter_seed: int = 0,
        prefixes: np.ndarray | None = None,
        sessions: SessionPlan | None = None,
    ) -> None:
        self.env = env
        self.model = model
        # routing other than a shared queue: each arrival waits in the queue of the GPU core/routing.py chose
        self.routed = model.routing is not Routing.SHARED_QUEUE
        self.waiting: ArrivalQueue
        if sessions is not None:  # a conversation's next turn is sent when its turn ends (waiting.SessionTurns)
            self.waiting = session_queue(times, tiers, gpus, self._route if self.routed else None, sessions)
        elif self.routed:
            self.waiting = RoutedArrivalQueue(times, tiers, gpus, self._route)
        else:
            self.waiting = ArrivalQueue(times, tiers)
        self.sessions = sessions is not None
        self.lag_s = model.output_token_ms / 1000.0  # a streamed token reaches its client this much later each
        self.routed_so_far = 0
        self.tiers = tiers.tolist()
        self.prompt = prompt.tolist()
        self.output = output.tolist()
        # KV tokens a sequence holds until it finishes (prefix caching counts blocks in its cache instead; paged KV
        # the blocks it holds now, set at admission and grown as it decodes).
        self.paged = model.kv_policy is KvPolicy.PAGED
        plain = not model.prefix_caching and not self.paged
        self.reserve = (prompt.astype(np.int64) + output).tolist() if plain else [0] * times.size
        n = times.size
        self._first: list[float] = [math.nan] * n
        self._done: list[float] = [math.nan] * n
        self._failed: list[int] = []
        self._refused: list[int] = []
        self.max_seqs = model.max_num_seqs
        self.kv_budget = model.kv_cache_tokens if model.kv_cache_tokens is not None else math.inf
        if self.paged:
            self.kv_budget = model.kv_cache_blocks
        self.token_budget = model.max_batched_tokens
        # The step formula's coefficients, read once: model.step_ms's own expression, inlined on the hot path.
        self.decode_step_ms, self.prefill_ms, self.per_seq_ms, self.admit_ms = (
            model.decode_step_ms,
            model.prefill_ms_per_token,
            model.decode_ms_per_seq,
            model.admit_ms_per_request,
        )
        # The extended model (SPEC section 12) goes through model.step_ms; steps then vary within a decode run.
        self.extended = model.context_terms
        self.wakes = model.idle_wake_ms > 0
        self.kv_ms = model.decode_ms_per_kv_token
        self.kv_offset: dict[int, int] = {}  # a decoding request's prompt + 1 - the step it joined at
        # Prefix caching: what each prompt shares, its keys and blocks while it runs, the tokens it skipped.
        # `fill` is what a request prefills: its prompt, less its cached prefix (the same list without caching).
        self.caching = model.prefix_caching
        self.block = model.kv_block_tokens
        self.cache_blocks = model.kv_cache_blocks
        self.prefixes = prefixes.tolist() if prefixes is not None else [None] * n
        # running request -> [segments, holds, blocks, admission number]; sequences leaving at one step end release
        # their blocks in the order they were admitted, which sets the cache's LRU order (paged KV: blocks grow)
        self.held: dict[int, list] = {}
        self.admissions = 0
        self.leaving: list[int] = []
        self.fill = list(self.prompt) if self.caching or self.paged else self.prompt
        # Paged KV: a running decoding request's tokens held are token_base[i] + its GPU's steps done; a preempted
        # one's tokens emitted so far and when its last came; preemptions per request.
        self.context = list(self.prompt) if self.paged else self.prompt  # what a (re)computed prefill is against
        self.token_base: dict[int, int] = {}
        self.emitted_before: dict[int, int] = {}
        self.paused_at: dict[int, float] = {}
        self._preemptions = [0] * n if self.paged else []
        self._cached = [0] * n if self.caching else []
        self.gpus = [self._new_gpu() for _ in range(gpus)]
        self.jitter_seed = jitter_seed
        self.jitter = [StepJitter(model, jitter_seed, g) for g in range(gpus)] if model.cycle_jitter else None
        self.heap: list[tuple[float, int, int]] = []  # (step end, gpu, generation)
        self.now = 0.0  # the engine's own clock: ahead of SimPy's between fleet events
        self.idle: list[int] = []  # accepting GPUs with nothing to run, sorted: they pick up in index order
        # Inter-token gaps, one entry per step run: (gap s, gaps of enterprise, paid, free, when the run ended).
        # Flat lists, five and three numbers an entry: numpy reads them back an order of magnitude faster than tuples.
        self.gaps: list[float] = []
        self.runs: list[float] = []  # each step run: start, end, sequences it held
        self.scheduler: simpy.Process | None = None
        self.fleet = Fleet(
            env,
            model,
            gpus,
            rng,
            self,
            load_factor=load_factor,
            capacity=model.max_num_seqs,
            horizon_s=horizon_s,
            sample_every_s=sample_every_s,
        )

    # -- results ----------------------------------------------------------------------------------

    @property
    def first_token(self) -> np.ndarray:
        return np.asarray(self._first)

    @property
    def completion(self) -> np.ndarray:
        return np.asarray(self._done)

    @property
    def failed(self) -> np.ndarray:
        failed = np.zeros(len(self._done), dtype=bool)
        failed[self._failed] = True
        return failed

    @property
    def refused(self) -> np.ndarray:
        """Requests longer than the whole KV cache, which no GPU could ever run."""
        refused = np.zeros(len(self._done), dtype=bool)
        refused[self._refused] = True
        return refused

    @property
    def preemptions(self) -> np.ndarray:
        """Times each request was preempted (paged KV)."""
        return np.asarray(self._preemptions, dtype=np.int64)

    @property
    def cached_tokens(self) -> np.ndarray:
        """Prompt tokens each request found cached (prefix caching on)."""
        return np.asarray(self._cached, dtype=np.int64)

    def token_gaps(self) -> TokenGaps:
        gaps = np.fromiter(self.gaps, dtype=np.float64, count=len(self.gaps)).reshape(-1, 5)
        return TokenGaps(gaps[:, 0] * 1000.0, gaps[:, 1:4].astype(np.int64), gaps[:, 4])

    def batches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start, end and size of every step run (what the report counts as GPU busy time and batch size)."""
        runs = np.fromiter(self.runs, dtype=np.float64, count=len(self.runs)).reshape(-1, 3)
        return runs[:, 0], runs[:, 1], runs[:, 2].astype(np.int64)

    # -- the loop: steps in time order; SimPy only for the fleet's events -------------------------

    def run(self):  # SimPy process
        env = self.env
        self.idle = list(range(len(self.gpus)))
        while True:
            self.now = max(self.now, env.now)
            next_event, events_at = self._next_event, self._events_at
            event = next_event()
            fleet_next = env.peek()
            while event < fleet_next:  # steps before the fleet's next event need no SimPy event of their own
                events_at(event)
                event = next_event()
            if event == math.inf and self.waiting.exhausted and not self.heap:
                return  # every arrival taken or shed, every step done
            wait = event - env.now if event < math.inf else 1e9  # inf: nothing serves; the fleet must change
            try:  # noqa: SIM105  (contextlib.suppress would build an object per wake-up on this hot loop)
                yield env.timeout(max(wait, 0.0))
            except simpy.Interrupt:  # a poke: the fleet changed, re-plan now
                pass

    def _next_event(self) -> float:
        heap, gpus = self.heap, self.gpus
        while heap and heap[0][2] != gpus[heap[0][1]].generation:
            heapq.heappop(heap)  # a step voided by a failure
        event = heap[0][0] if heap else math.inf
        if self.idle:
            pickup = self.now if self._idle_work() else self.waiting.next_time
            if pickup < event:
                return pickup
        return event

    def _idle_work(self) -> bool:
        """Whether an idle GPU has someone to admit: anyone waiting, or, routed, someone in its own queue."""
        if not self.routed:
            return self.waiting.queued > 0
        own = self.waiting.own_queued  # type: ignore[attr-defined]
        return any(own[g] for g in self.idle)

    def _events_at(self, now: float) -> None:
        self.now = now
        waiting = self.waiting
        limit = now + EPS
        if waiting.next_time <= limit:
            waiting.admit_until(now)
        heap, gpus, plan = self.heap, self.gpus, self._plan
        while heap and heap[0][0] <= limit:  # steps ending now, by GPU index
            _, g, generation = heapq.heappop(heap)
            gpu = gpus[g]
            if generation == gpu.generation:
                self._end_step(gpu, now)
                plan(g, now)
        if self.idle and waiting.queued:
            for g in list(self.idle):  # idle GPUs pick up what waits (their own, when routed), in index order
                if waiting.own_queued[g] if self.routed else waiting.queued:  # type: ignore[attr-defined]
                    self.idle.remove(g)
                    plan(g, now)

    # -- one GPU: admit, plan a step (or a run of identical ones), end it --------------------------

    def _plan(self, g: int, now: float) -> None:
        gpu = self.gpus[g]
        waiting = self.waiting
        if self.paged and gpu.order:
            self._grow(g, gpu)
        queued = waiting.own_queued[g] if self.routed else waiting.queued  # type: ignore[attr-defined]
        if gpu.accepting and queued and gpu.running < self.max_seqs:
            self._admit(gpu, g)
        if gpu.running == 0:
            gpu.busy = False
            if gpu.accepting:
                bisect.insort(self.idle, g)
            return
        prefilling = gpu.prefilling
        if prefilling:
            sequences, prefill, joining, budget, fill = gpu.n_decoding, 0, 0, self.token_budget, self.fill
            chunks = []
            for entry in prefilling:
                chunk = entry[1] if entry[1] < budget else budget
                chunks.append(chunk)
                budget -= chunk
                prefill += chunk
                sequences += chunk > 0
                joining += chunk > 0 and entry[1] == fill[entry[0]]  # its first chunk: admitted for this step
            gpu.chunks = chunks
            if self.extended:
                step_ms = self._extended_step_ms(gpu, chunks, prefill, sequences, joining)
            else:
                step_ms = self.decode_step_ms + self.prefill_ms * prefill + self.per_seq_ms * sequences
                step_ms += self.admit_ms * joining
            step_s = step_ms / 1000.0
            steps = 1
            if self.jitter is not None:
                step_s *= float(self.jitter[g].take(1)[0])
            if self.wakes:  # only a prefilling step can start an idle engine
                step_s += self.model.wake_ms(now - gpu.last_end) / 1000.0
        else:  # pure decode: skip ahead to the next finish, or to the next arrival it could admit
            if self.extended:  # the decoding context's term is added per step in _plan_varying
                step_s = self.model.step_ms(0, gpu.n_decoding) / 1000.0
            else:
                step_s = (self.decode_step_ms + self.per_seq_ms * gpu.n_decoding) / 1000.0
            steps = gpu.finishing[0][0] - gpu.steps_done if not self.paged else 1  # paged: a block may be due
            cut = steps > 1 and gpu.accepting and gpu.running < self.max_seqs and step_s > 0
            arrival = waiting.next_time if cut else math.inf
            if cut and waiting.queued and not self.routed and len(self.gpus) > 1:
                # The head waits for KV room here; another GPU may take it at any step end, and the one behind
                # it may fit here: step by step, as the reference admits at every step end.
                steps, arrival = 1, math.inf
            if self.jitter is not None or self.kv_ms:
                self._plan_varying(g, gpu, now, step_s, steps, arrival)
                return
            if arrival < math.inf:
                steps = min(steps, max(1, math.ceil((arrival - now) / step_s - EPS)))
        gpu.busy, gpu.step_s, gpu.steps, gpu.jittered = True, step_s, steps, None
        self._start_run(g, gpu, now, now + step_s * steps)

    def _extended_step_ms(self, gpu: _Gpu, chunks: list[int], prefill: int, sequences: int, joining: int) -> float:
        """A step with prefill chunks under the extended model: each chunk against the prompt prefilled before it."""
        prompt = self.context
        prefill_sq = prefill_context = 0
        for entry, chunk in zip(gpu.prefilling, chunks):  # noqa: B905  (same length by construction)
            prefill_sq += chunk * chunk
            prefill_context += chunk * (prompt[entry[0]] - entry[1])
        return self.model.step_ms(
            prefill, sequences, joining, kv_tokens=gpu.kv_base + gpu.n_decoding * gpu.steps_done,
            prefill_sq=prefill_sq, prefill_context=prefill_context,
        )  # fmt: skip

    def _plan_varying(self, g: int, gpu: _Gpu, now: float, step_s: float, steps: int, arrival: float) -> None:
        """A run of decode steps, each its own length (a measured spread; a context that grows a token a step):
        up to the next finish, or the step an arrival ends in."""
        if self.kv_ms:
            context = gpu.kv_base + gpu.n_decoding * (gpu.steps_done + np.arange(steps, dtype=np.float64))
            lengths = step_s + self.kv_ms * context / 1000.0
        else:
            lengths = np.full(steps, step_s)
        if self.jitter is not None:
            lengths *= self.jitter[g].peek(steps)
        if arrival < math.inf:  # the first step that ends at or after the arrival (as the plain run's cut)
            ends = np.cumsum(lengths)
            steps = max(1, min(steps, int(np.searchsorted(ends, arrival - now - EPS * step_s)) + 1))
            lengths = lengths[:steps]
        if self.jitter is not None:
            self.jitter[g].take(steps)
        gpu.busy, gpu.step_s, gpu.steps, gpu.jittered = True, step_s, steps, lengths
        self._start_run(g, gpu, now, now + float(lengths.sum()))

    def _start_run(self, g: int, gpu: _Gpu, now: float, end: float) -> None:
        self.runs.extend((now, end, gpu.running))
        heapq.heappush(self.heap, (end, g, gpu.generation))

    def _admit(self, gpu: _Gpu, g: int) -> None:
        """Waiting requests by tier, FIFO within a tier, while a sequence slot and KV room remain."""
        waiting, prompt, budget, reserves = self.waiting, self.prompt, self.kv_budget, self.reserve
        prefilling, max_seqs, routed = gpu.prefilling, self.max_seqs, self.routed
        while (waiting.own_queued[g] if routed else waiting.queued) and gpu.running < max_seqs:  # type: ignore[attr-defined]
            i = waiting.pop(g)
            if gpu.cache is not None:
                admitted = self._admit_cached(gpu.cache, i, g)
                if admitted is None:
                    continue  # refused
                if not admitted:
                    return
                prefilling.append([i, self.fill[i]])
                gpu.running += 1
                continue
            if self.paged:
                self.fill[i] = self.context[i] = prompt[i] + self.emitted_before.get(i, 0)  # and its answer so far
                # its blocks up to its next token; at its longest it must fit alone, or it would preempt itself
                reserves[i] = -(-(self.fill[i] + 1) // self.block)
                longest = blocks_needed(prompt[i], self.output[i], self.block)
            reserve = reserves[i]
            if gpu.kv + reserve > budget or (self.paged and longest > budget):
                if reserve <= budget and (not self.paged or longest <= budget):
                    waiting.push_back(i, g)  # the first that does not fit blocks the ones behind it
                    return
                self._refused.append(i)  # would never fit, even alone: refused at once (an engine's 400)
                self._done[i] = self.now
                if self.sessions:
                    self.waiting.turn_over(i, self.now)  # type: ignore[attr-defined]
                continue
            prefilling.append([i, self.fill[i]])
            gpu.kv += reserve
            gpu.running += 1
            if self.paged:
                gpu.order.append(i)

    def _admit_cached(self, cache: PrefixCache, i: int, g: int) -> bool | None:
        """Admit ``i`` into a GPU's blocks, its leading resident blocks shared; False: it waits (and blocks the
        ones behind it); None: too big for the whole cache, refused at once, as without caching. With paged KV it
        takes the blocks up to its next token, and a preempted one's context is its prompt and answer so far,
        whose blocks its preemption left cached (so it may find them still there)."""
        prompt, block = self.prompt[i], self.block
        segments = prompt_segments(self.prefixes[i], i, prompt, block)
        blocks = longest = blocks_needed(prompt, self.output[i], block)
        context = prompt
        if self.paged:
            emitted = self.emitted_before.get(i, 0)
            context = prompt + emitted
            if emitted:
                segments = with_answer(segments, answer_segment(self.prefixes[i], i, prompt, emitted, block))
            blocks = -(-(context + 1) // block)
        if longest > self.cache_blocks:
            self._refused.append(i)
            self._done[i] = self.now
            if self.sessions:
                self.waiting.turn_over(i, self.now)  # type: ignore[attr-defined]
            return None
        holds = cache.hits(segments)
        if not cache.fits(holds, segments, blocks):
            self.waiting.push_back(i, g)
            return False
        cache.admit(holds, segments, blocks)
        skipped = cached_tokens(sum(holds), context, block)
        if not self.paged or not self._preemptions[i]:  # what its first admission found, as an engine reports it
            self._cached[i] = skipped
        self.fill[i] = context - skipped
        if self.paged:
            self.context[i] = context
        self.held[i] = [segments, holds, blocks, self.admissions]
        self.admissions += 1
        if self.paged:
            self.reserve[i] = blocks
            self.gpus[g].order.append(i)
        return True

    def _end_step(self, gpu: _Gpu, now: float) -> None:
        steps = gpu.steps
        steps_done = gpu.steps_done = gpu.steps_done + steps
        gpu.busy, gpu.last_end = False, now
        decoding = gpu.decoding
        if gpu.n_decoding:  # every decoding sequence emitted `steps` tokens, one step apart
            if gpu.jittered is None:
                self.gaps.extend((gpu.step_s, decoding[0] * steps, decoding[1] * steps, decoding[2] * steps, now))
            else:
                for length in gpu.jittered.tolist():
                    self.gaps.extend((length, decoding[0], decoding[1], decoding[2], now))
        done, reserve, tiers, finishing = self._done, self.reserve, self.tiers, gpu.finishing
        if gpu.prefilling:
            still = []
            output, first = self.output, self._first
            for entry, chunk in zip(gpu.prefilling, gpu.chunks):  # noqa: B905  (same length by construction)
                entry[1] -= chunk
                if entry[1]:
                    still.append(entry)
                    continue
                i = entry[0]
                emitted = 1  # the last prompt chunk emits the first token (or, recomputed, the next)
                if self.paged and i in self.emitted_before:
                    emitted += self.emitted_before.pop(i)
                    gap = [0.0, 0.0, 0.0]
                    gap[tiers[i]] = 1.0
                    self.gaps.extend((now - self.paused_at.pop(i), *gap, now))  # the pause, one gap
                else:
                    first[i] = now
                if gpu.cache is not None:
                    segments, holds, _, _ = self.held[i]
                    gpu.cache.prefilled(holds, segments)
                if output[i] == emitted:
                    done[i] = now
                    if self.sessions:
                        self.waiting.turn_over(i, now + self.lag_s * output[i])  # type: ignore[attr-defined]
                    gpu.kv -= reserve[i]
                    gpu.running -= 1
                    if gpu.cache is not None:
                        self.leaving.append(i)
                    if self.paged:
                        gpu.order.remove(i)
                    continue
                heapq.heappush(finishing, (steps_done + output[i] - emitted, i))
                decoding[tiers[i]] += 1
                gpu.n_decoding += 1
                if self.paged:
                    self.token_base[i] = self.context[i] + 1 - steps_done
                if self.kv_ms:
                    offset = self.kv_offset[i] = self.context[i] + 1 - steps_done
                    gpu.kv_base += offset
            gpu.prefilling = still
        if finishing and finishing[0][0] <= steps_done:
            freed, leaving = 0, 0
            while finishing and finishing[0][0] <= steps_done:
                _, i = heapq.heappop(finishing)
                decoding[tiers[i]] -= 1
                done[i] = now
                if self.sessions:
                    self.waiting.turn_over(i, now + self.lag_s * self.output[i])  # type: ignore[attr-defined]
                if self.kv_ms:
                    gpu.kv_base -= self.kv_offset.pop(i)
                if gpu.cache is not None:
                    self.leaving.append(i)
                if self.paged:
                    gpu.order.remove(i)
                    del self.token_base[i]
                freed += reserve[i]
                leaving += 1
            gpu.n_decoding -= leaving
            gpu.kv -= freed
            gpu.running -= leaving
        if self.leaving:
            self._release_leaving(gpu.cache)  # type: ignore[arg-type]  (only prefix caching books leavers)

    def _grow(self, g: int, gpu: _Gpu) -> None:
        """Paged KV, before a step: each decoding sequence, in admission order, takes the block its next token
        needs; with none free, the GPU's running sequence of the lowest tier, latest arrival, is preempted (it may
        be the one growing) until the block is found."""
        base, reserve, block, budget, tiers = self.token_base, self.reserve, self.block, self.kv_budget, self.tiers
        cache = gpu.cache
        for i in list(gpu.order):
            if i not in base:
                continue  # prefilling (its blocks were taken at admission), or preempted in this pass
            need = -(-(base[i] + gpu.steps_done + 1) // block)
            while i in base and reserve[i] < need:
                if cache is not None and cache.free() >= 1:  # cached blocks nobody holds are evicted for it
                    cache.take(1)
                    reserve[i] += 1
                    self.held[i][2] += 1
                elif cache is None and gpu.kv + 1 <= budget:
                    reserve[i] += 1
                    gpu.kv += 1
                else:
                    self._preempt(g, gpu, max(gpu.order, key=lambda j: (tiers[j], j)))

    def _preempt(self, g: int, gpu: _Gpu, v: int) -> None:
        """Free ``v``'s blocks and return it to the head of its tier's queue; it keeps its tokens emitted. With
        prefix caching its full blocks stay cached, as a finished sequence's do: its context's (prompt and answer
        so far) once prefilled, only the hits it shared while it still prefilled."""
        gpu.order.remove(v)
        decoding = v in self.token_base
        emitted = self.token_base[v] + gpu.steps_done - self.prompt[v] if decoding else 0
        if gpu.cache is not None:
            segments, holds, blocks, _ = self.held.pop(v)
            if decoding:
                answer = answer_segment(self.prefixes[v], v, self.prompt[v], emitted, self.block)
                gpu.cache.release(gpu.cache.keep_answer(segments, [answer] if answer else []), blocks)
            else:
                gpu.cache.release(segments, blocks, holds)
        else:
            gpu.kv -= self.reserve[v]
        self.reserve[v] = 0
        gpu.running -= 1
        if decoding:  # its last token came at the step that just ended
            del self.token_base[v]
            self.emitted_before[v] = emitted
            self.paused_at[v] = self.now
            gpu.finishing = [entry for entry in gpu.finishing if entry[1] != v]
            heapq.heapify(gpu.finishing)
            gpu.decoding[self.tiers[v]] -= 1
            gpu.n_decoding -= 1
            if self.kv_ms:
                gpu.kv_base -= self.kv_offset.pop(v)
        else:  # still prefilling: it starts over
            gpu.prefilling = [entry for entry in gpu.prefilling if entry[0] != v]
        self._preemptions[v] += 1
        self.waiting.push_back(v, g)

    def _route(self, i: int) -> int:
        """The GPU request ``i`` waits for (core/routing.py), from what each GPU that takes work runs, queues and
        holds now; -1 while none takes work (failed, cold, released)."""
        gpus, own, max_seqs = self.gpus, self.waiting.own_queued, self.max_seqs  # type: ignore[attr-defined]
        open_gpus = [g for g, gpu in enumerate(gpus) if gpu.accepting]
        if not open_gpus:
            return -1
        loads = [gpus[g].running + own[g] for g in open_gpus]
        free = [load < max_seqs for load in loads]
        hits = None
        if self.model.routing is Routing.PREFIX_AFFINITY and self.caching:
            segments = prompt_segments(self.prefixes[i], i, self.prompt[i], self.block)
            hits = [sum(gpus[g].cache.hits(segments)) for g in open_gpus]  # type: ignore[union-attr]
        turn = self.routed_so_far
        self.routed_so_far += 1
        return open_gpus[choose_replica(self.model.routing, loads, free, hits, turn)]

    def _release_leaving(self, cache: PrefixCache) -> None:
        held, leaving, block = self.held, self.leaving, self.block
        leaving.sort(key=lambda i: held[i][3])
        for i in leaving:
            segments, _, blocks, _ = held.pop(i)
            answer = answer_segment(self.prefixes[i], i, self.prompt[i], self.output[i], block)
            if answer is not None:  # its answer's full blocks stay cached too (a conversation's next turn hits them)
                segments = cache.keep_answer(segments, [answer])
            cache.release(segments, blocks)
        leaving.clear()

    def _new_gpu(self, accepting: bool = True, generation: int = 0) -> _Gpu:
        cache = PrefixCache(self.cache_blocks) if self.caching else None
        return _Gpu(accepting=accepting, generation=generation, cache=cache)

    # -- what the fleet tells us ------------------------------------------------------------------

    def poke(self) -> None:
        proc = self.scheduler
        if proc is not None and proc.is_alive and proc.target is not None and proc is not self.env.active_process:
            proc.interrupt()

    def gpu_added(self) -> None:
        self.gpus.append(self._new_gpu(accepting=False))
        if self.routed:
            self.waiting.add_gpu()  # type: ignore[attr-defined]
        if self.jitter is not None:
            self.jitter.append(StepJitter(self.model, self.jitter_seed, len(self.jitter)))

    def gpu_changed(self, g: int, state: GpuState) -> None:
        gpu = self.gpus[g]
        gpu.accepting = state is GpuState.UP
        if not gpu.accepting and g in self.idle:
            self.idle.remove(g)
        elif gpu.accepting and not gpu.busy and g not in self.idle:
            bisect.insort(self.idle, g)
        if self.routed:  # what waits for a GPU that stopped is routed again; a GPU that came up is a choice
            waiting: RoutedArrivalQueue = self.waiting  # type: ignore[assignment]
            if gpu.accepting:
                waiting.reopen()
            else:
                waiting.close(g)
        self.poke()

    def gpu_failing(self, g: int) -> None:
        gpu, now = self.gpus[g], self.env.now
        lost = [entry[0] for entry in gpu.prefilling] + [i for _, i in gpu.finishing]
        for i in lost:  # the clients get their error now
            self._done[i] = now
            if self.sessions:
                self.waiting.turn_over(i, now)  # type: ignore[attr-defined]
        self._failed.extend(lost)
        for i in lost:
            self.held.pop(i, None)
        self.gpus[g] = self._new_gpu(accepting=False, generation=gpu.generation + 1)  # its cache is lost with it
        if g in self.idle:
            self.idle.remove(g)

    def retire_choice(self, up: list[int]) -> int:
        return min(up, key=lambda g: (self.gpus[g].running, g))
