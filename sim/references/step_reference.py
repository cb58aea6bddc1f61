"""A slow, obviously-correct model of continuous batching: one SimPy process per request, one step at a time.

This is how one would first write it: each request arrives, is admitted or shed by the
zones on the waiting depth, and waits in its tier; each GPU is a process that, before
every step, admits waiting requests by tier while a sequence slot and KV room remain,
runs one step over its sequences (prefill chunks within the token budget, one token per
sequence), and lets finished ones go. It shares nothing with the fast engine but the
service model and the zones, and tests hold the fast engine to it request by request.
It covers the fleet without failures or autoscaling. Engine overheads (SPEC section 12)
are a wait of each request's own before it reaches the zones, and a client-side lag of
``output_token_ms`` per token it has received. A measured step spread (``cycle_jitter``)
multiplies each step by the next draw of that GPU's own stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import simpy

from ...core.admission import zone_admits
from ...core.jitter import StepJitter
from ...core.model import ServiceModel
from ...core.tiers import Tier

__all__ = ["ReferenceTokens", "simulate_steps_reference"]


@dataclass
class ReferenceTokens:
    admitted: np.ndarray  # bool
    first_token: np.ndarray  # float64 seconds; nan when shed
    finished: np.ndarray
    gaps: list[float]  # every inter-token gap of every request, in seconds


@dataclass
class _Seq:
    i: int
    prefill_left: int
    out_left: int
    last_token: float = float("nan")  # when its client received its latest token
    emitted: int = 0
    chunk: int = 0


def simulate_steps_reference(
    model: ServiceModel,
    times: np.ndarray,
    tiers: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    gpus: int,
    *,
    jitter_seed: int = 0,
) -> ReferenceTokens:
    env = simpy.Environment()
    n = times.size
    admitted = np.ones(n, dtype=bool)
    first_token = np.full(n, np.nan)
    finished = np.full(n, np.nan)
    gaps: list[float] = []
    waiting: list[deque[int]] = [deque() for _ in Tier]
    thresholds = model.backpressure.thresholds(gpus, model.max_num_seqs)
    kv_budget = model.kv_cache_tokens if model.kv_cache_tokens is not None else float("inf")
    signal = {"work": env.event()}

    lag_s = model.output_token_ms / 1000.0

    def request(i: int):
        yield env.timeout(float(model.admission_delay_ms(int(prompt[i]))) / 1000.0)
        depth = sum(len(q) for q in waiting)
        if not zone_admits(int(tiers[i]), depth, thresholds):
            admitted[i] = False
            return
        waiting[int(tiers[i])].append(i)
        if not signal["work"].triggered:
            signal["work"].succeed()
        yield env.timeout(0)

    def source():
        for i in range(n):
            if times[i] > env.now:
                yield env.timeout(times[i] - env.now)
            env.process(request(i))

    def gpu(g: int):
        jitter = StepJitter(model, jitter_seed, g) if model.cycle_jitter else None  # this GPU's step spread
        running: list[_Seq] = []
        kv = 0
        while True:
            while len(running) < model.max_num_seqs:
                tier = next((t for t in range(len(waiting)) if waiting[t]), None)
                if tier is None:
                    break
                i = waiting[tier][0]
                if kv + prompt[i] + output[i] > kv_budget:
                    break  # the first that does not fit blocks the rest
                waiting[tier].popleft()
                running.append(_Seq(i, int(prompt[i]), int(output[i])))
                kv += int(prompt[i] + output[i])
            if not running:
                work = signal["work"] = env.event() if signal["work"].triggered else signal["work"]
                yield work
                continue
            budget = model.max_batched_tokens
            in_step = []
            for seq in running:
                seq.chunk = 0
                if seq.prefill_left > 0:
                    seq.chunk = min(seq.prefill_left, budget)
                    budget -= seq.chunk
                    if seq.chunk == 0:
                        continue
                in_step.append(seq)
            prefill = sum(seq.chunk for seq in in_step)
            joining = sum(1 for seq in in_step if seq.chunk and seq.prefill_left == prompt[seq.i])
            spread = float(jitter.take(1)[0]) if jitter is not None else 1.0
            yield env.timeout(model.step_ms(prefill, len(in_step), joining) * spread / 1000.0)
            for seq in in_step:
                if seq.chunk:
                    seq.prefill_left -= seq.chunk
                    if seq.prefill_left > 0:
                        continue  # more chunks to go: no token yet
                seq.emitted += 1
                received = env.now + seq.emitted * lag_s  # the k-th token is k lags behind its step
                if seq.emitted == 1:
                    first_token[seq.i] = received
                else:
                    gaps.append(received - seq.last_token)
                seq.last_token = received
                seq.out_left -= 1
                if seq.out_left == 0:
                    finished[seq.i] = received
            for seq in [s for s in running if s.out_left == 0]:
                running.remove(seq)
                kv -= int(prompt[seq.i] + output[seq.i])

    env.process(source())
    for g in range(gpus):
        env.process(gpu(g))
    env.run()
    return ReferenceTokens(admitted, first_token, finished, gaps)
