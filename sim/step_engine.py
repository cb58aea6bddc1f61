"""Continuous batching, step by step: how vLLM, SGLang and TGI run (SPEC section 10).

Each GPU runs *steps*. A step holds the GPU's running sequences: each either prefills
(part of) its prompt or decodes, and each emits one token at the step's end (a prompt's
last prefill chunk emits its first token). A step lasts ``decode_step_ms +
prefill_ms_per_token * (prompt tokens prefilled) + decode_ms_per_seq * (sequences in
it)``. Between steps the GPU admits waiting requests by tier, FIFO within a tier, while
it runs fewer than ``max_num_seqs`` and the running sequences' prompt and output
tokens fit ``kv_cache_tokens`` (reserved whole at admission, so a sequence is never
evicted); a step prefills at most ``max_batched_tokens`` prompt tokens, so a longer
prompt is prefilled in chunks. A finished sequence leaves at once; a request arriving
during a step waits for its end.

Speed comes from the same idea as the batch engine: nothing per token. A stretch of
pure decode steps with nobody to admit is one event of ``k`` identical steps (``k`` up
to the next sequence to finish or the next arrival), request data lives in numpy
arrays, and inter-token gaps are kept as (gap, count per tier) pairs, not one per token.
:mod:`infer_plan.sim.step_reference` is the slow, one-step-at-a-time model the tests
hold this one to, request by request.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from ..core.dispatch import EPS
from ..core.model import ServiceModel
from ..core.tiers import Tier
from .fleet import Fleet, GpuState
from .waiting import WaitingQueues

__all__ = ["StepEngine"]

_N_TIERS = len(Tier)
_EMPTY = np.empty(0, dtype=np.int64)


@dataclass(slots=True)
class _Gpu:
    """One GPU's running sequences (admission order) and the step it is in."""

    ids: np.ndarray = field(default_factory=lambda: _EMPTY)
    prefill_left: np.ndarray = field(default_factory=lambda: _EMPTY)
    out_left: np.ndarray = field(default_factory=lambda: _EMPTY)
    kv: int = 0  # reserved prompt + output tokens of the running sequences
    accepting: bool = True  # serving and not released: admits new sequences
    busy: bool = False
    generation: int = 0  # bumped when its step is void (a failure), so a stale heap entry is skipped
    # The step (or run of k identical decode steps) in flight:
    step_s: float = 0.0
    steps: int = 0
    chunk: np.ndarray = field(default_factory=lambda: _EMPTY)  # prompt tokens each sequence prefills
    prefilling: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))


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
        mean_lengths: tuple[float, float],
    ) -> None:
        self.env = env
        self.model = model
        self.waiting = WaitingQueues(times, tiers)
        self.tiers = tiers
        self.prompt = prompt.astype(np.int64)
        self.output = output.astype(np.int64)
        self.reserve = self.prompt + self.output  # KV tokens a sequence holds until it finishes
        n = times.size
        self.first_token = np.full(n, np.nan)
        self.finished = np.full(n, np.nan)
        self.failed = np.zeros(n, dtype=bool)
        self.max_seqs = model.max_num_seqs
        self.kv_budget = model.kv_cache_tokens if model.kv_cache_tokens is not None else math.inf
        self.token_budget = model.max_batched_tokens
        self.gpus = [_Gpu() for _ in range(gpus)]
        self.heap: list[tuple[float, int, int]] = []  # (step end, gpu, generation)
        self.gap_s: list[float] = []  # inter-token gaps, one entry per step run ...
        self.gap_count: list[np.ndarray] = []  # ... with how many gaps of that length each tier had
        self.scheduler: simpy.Process | None = None
        p, o = mean_lengths
        self.fleet = Fleet(
            env,
            model,
            gpus,
            rng,
            self,
            load_factor=lambda rate, fleet: model.load_factor(rate, fleet, prompt_tokens=p, output_tokens=o),
            capacity=model.max_num_seqs,
            horizon_s=horizon_s,
            sample_every_s=sample_every_s,
        )

    # -- the scheduler: one SimPy process that moves to the next step end or pick-up ----------

    def run(self):  # SimPy process
        env, waiting = self.env, self.waiting
        while True:
            now = env.now
            wake = self.heap[0][0] if self.heap else math.inf
            if self._idle_accepting():
                wake = now if waiting.queued else min(wake, waiting.next_arrival_time())
            if wake == math.inf:
                if waiting.next_arrival >= waiting.n and not self.heap:
                    return  # every arrival taken or shed, every step done
                wake = now + 1e9  # work waits but no GPU serves: sleep until the fleet changes (poke)
            if wake > now:
                try:  # noqa: SIM105  (contextlib.suppress would build an object per step on this hot loop)
                    yield env.timeout(wake - now)
                except simpy.Interrupt:  # a poke: the fleet changed, re-plan now
                    pass
                now = env.now
            waiting.admit_until(now)
            while self.heap and self.heap[0][0] <= now + EPS:  # steps ending now, by GPU index
                _, g, generation = heapq.heappop(self.heap)
                gpu = self.gpus[g]
                if generation == gpu.generation and gpu.busy:
                    self._end_step(gpu, now)
                    self._plan(g, now)
            if waiting.queued:
                for g, gpu in enumerate(self.gpus):  # idle GPUs pick up what waits, in index order
                    if not gpu.busy and gpu.accepting:
                        self._plan(g, now)

    def poke(self) -> None:
        proc = self.scheduler
        if proc is not None and proc.is_alive and proc.target is not None and proc is not self.env.active_process:
            proc.interrupt()

    def _idle_accepting(self) -> bool:
        return any(not gpu.busy and gpu.accepting for gpu in self.gpus)

    # -- one GPU: admit, plan a step (or k identical ones), end it --------------------------------

    def _plan(self, g: int, now: float) -> None:
        gpu = self.gpus[g]
        if gpu.accepting and self.waiting.queued:
            self._admit(gpu)
        running = gpu.ids.size
        if running == 0:
            gpu.busy = False
            return
        prefilling = gpu.prefill_left > 0
        if prefilling.any():
            wanted = np.where(prefilling, gpu.prefill_left, 0)
            before = np.cumsum(wanted) - wanted  # prompt tokens ahead of each sequence in admission order
            chunk = np.clip(self.token_budget - before, 0, wanted)
            in_step = int((~prefilling).sum() + (chunk > 0).sum())
            step_s = self.model.step_ms(int(chunk.sum()), in_step) / 1000.0
            steps = 1
        else:
            chunk = _EMPTY
            step_s = self.model.step_ms(0, running) / 1000.0
            steps = int(gpu.out_left.min())
            if gpu.accepting and running < self.max_seqs and step_s > 0:
                arrival = self.waiting.next_arrival_time()  # it could join at the first step end after it
                if arrival < math.inf:
                    steps = min(steps, max(1, math.ceil((arrival - now) / step_s - EPS)))
        gpu.busy, gpu.step_s, gpu.steps, gpu.chunk, gpu.prefilling = True, step_s, steps, chunk, prefilling
        heapq.heappush(self.heap, (now + step_s * steps, g, gpu.generation))

    def _admit(self, gpu: _Gpu) -> None:
        """Waiting requests by tier, FIFO within a tier, while the GPU has a sequence slot and KV room."""
        room = self.max_seqs - gpu.ids.size
        if room <= 0:
            return
        candidates = self.waiting.heads(room)
        fits = gpu.kv + np.cumsum(self.reserve[candidates]) <= self.kv_budget
        n = int(fits.size if fits.all() else np.argmin(fits))  # the first that does not fit blocks the rest
        if n == 0:
            return
        ids = np.concatenate(self.waiting.take(n))
        gpu.ids = np.concatenate((gpu.ids, ids))
        gpu.prefill_left = np.concatenate((gpu.prefill_left, self.prompt[ids]))
        gpu.out_left = np.concatenate((gpu.out_left, self.output[ids]))
        gpu.kv += int(self.reserve[ids].sum())

    def _end_step(self, gpu: _Gpu, now: float) -> None:
        ids, out_left, steps = gpu.ids, gpu.out_left, gpu.steps
        prefilling = gpu.prefilling
        decoding = ~prefilling
        first = np.zeros_like(prefilling)
        if prefilling.any():
            gpu.prefill_left = gpu.prefill_left - gpu.chunk
            first = prefilling & (gpu.prefill_left == 0)
            self.first_token[ids[first]] = now
        out_left = out_left - first - decoding * steps
        if decoding.any():
            self.gap_s.append(gpu.step_s)
            self.gap_count.append(np.bincount(self.tiers[ids[decoding]], minlength=_N_TIERS) * steps)
        done = (out_left == 0) & (first | decoding)
        gpu.out_left = out_left
        gpu.busy = False
        if done.any():
            self.finished[ids[done]] = now
            gpu.kv -= int(self.reserve[ids[done]].sum())
            keep = ~done
            gpu.ids, gpu.prefill_left, gpu.out_left = ids[keep], gpu.prefill_left[keep], gpu.out_left[keep]

    # -- what the fleet tells us ------------------------------------------------------------------

    def gpu_added(self) -> None:
        self.gpus.append(_Gpu(accepting=False))

    def gpu_changed(self, gpu: int, state: GpuState) -> None:
        self.gpus[gpu].accepting = state is GpuState.UP
        self.poke()

    def gpu_failing(self, g: int) -> None:
        gpu = self.gpus[g]
        if gpu.ids.size:
            self.failed[gpu.ids] = True
            self.finished[gpu.ids] = self.env.now  # the clients get their error now
        self.gpus[g] = _Gpu(accepting=False, generation=gpu.generation + 1)

    def retire_choice(self, up: list[int]) -> int:
        return min(up, key=lambda g: (self.gpus[g].ids.size, g))
