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
multiplies each step by the next draw of that GPU's own stream; a step that starts a GPU idle
for ``idle_after_ms`` or more then adds ``idle_wake_ms``. With ``prefix_caching``
each GPU keeps its blocks in a plain dict of users and an ordered dict of cached keys
(SPEC section 13), written out here step by step rather than shared with the engine. With
``routing`` each request joins the queue of the GPU :func:`~infer_plan.core.routing.choose_replica`
picks from what this model's processes run, queue and hold at its arrival. With paged KV
(``kv_policy = "paged"``) each sequence holds ``ceil(tokens / block)`` blocks for its
prompt, its answer so far and the token its next step emits; before each step the decoding
ones grow in admission order, preempting the lowest tier's latest arrival when no block is
free; a preempted one waits at the head of its tier and recomputes prompt and answer so far.
With sessions (``follows``, ``think_s``) a process per conversation sends each later turn a
think time after its client saw the turn before end (answered, shed or refused), until
``until_s``. With prefix caching a finished request's answer blocks are cached with its
prompt's (vLLM keeps them); a turn's are keyed by its session, for the next turn.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from ...core.admission import zone_admits
from ...core.jitter import StepJitter
from ...core.model import KvPolicy, Routing, ServiceModel
from ...core.prompt_blocks import SessionHistory, prompt_keys
from ...core.routing import choose_replica
from ...core.tiers import Tier

__all__ = ["ReferenceTokens", "simulate_steps_reference"]


@dataclass
class ReferenceTokens:
    admitted: np.ndarray  # bool
    first_token: np.ndarray  # float64 seconds; nan when shed
    finished: np.ndarray
    gaps: list[float]  # every inter-token gap of every request, in seconds
    cached_tokens: np.ndarray  # int64 prompt tokens each request found cached (0 without prefix caching)
    preemptions: np.ndarray  # int64 times each request was preempted (paged KV)
    sent: np.ndarray  # float64 when each was sent: its time, or for a session's later turn when it was (nan: never)


@dataclass
class _Seq:
    i: int
    prefill_left: int
    out_left: int
    last_token: float = float("nan")  # when its client received its latest token
    emitted: int = 0
    chunk: int = 0
    fill: int = 0  # prompt tokens it prefills: its prompt less its cached prefix
    keys: list = field(default_factory=list)  # prefix caching: its prompt's block keys
    context: int = 0  # tokens its prefill computes KV for: its prompt, and a preempted one's answer so far
    held: int = 0  # paged KV: blocks it holds
    hits: int = 0
    blocks: int = 0


def simulate_steps_reference(
    model: ServiceModel,
    times: np.ndarray,
    tiers: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    gpus: int,
    *,
    jitter_seed: int = 0,
    prefixes: np.ndarray | None = None,
    follows: np.ndarray | None = None,
    think_s: np.ndarray | None = None,
    until_s: float = float("inf"),
) -> ReferenceTokens:
    env = simpy.Environment()
    n = times.size
    sent = np.array(times, dtype=np.float64)
    next_turn = {int(follows[j]): j for j in range(n) if follows[j] >= 0} if follows is not None else {}
    admitted = np.ones(n, dtype=bool)
    first_token = np.full(n, np.nan)
    finished = np.full(n, np.nan)
    gaps: list[float] = []
    routed = model.routing is not Routing.SHARED_QUEUE
    # one waiting room per GPU when routed (every GPU reads room 0 otherwise)
    rooms: list[list[deque[int]]] = [[deque() for _ in Tier] for _ in range(gpus if routed else 1)]
    shown: list[dict] = [{} for _ in range(gpus)]  # per GPU: its running sequences and resident keys (the router's)
    turns = [0]
    thresholds = model.backpressure.thresholds(gpus, model.max_num_seqs)
    kv_budget = model.kv_cache_tokens if model.kv_cache_tokens is not None else float("inf")
    caching, block = model.prefix_caching, model.kv_block_tokens
    cache_blocks = kv_budget // block if model.kv_cache_tokens is not None else float("inf")  # (inf // n is nan)
    cached_tokens = np.zeros(n, dtype=np.int64)
    paged = model.kv_policy is KvPolicy.PAGED
    preemptions = np.zeros(n, dtype=np.int64)
    paused: dict[int, _Seq] = {}  # preempted sequences waiting to be recomputed
    # "latest arrival" is the latest to reach the engine's queue, after its front end (SPEC section 12's delay)
    reached = [float(times[i]) + float(model.admission_delay_ms(int(prompt[i]))) / 1000.0 for i in range(n)]

    def turn_over(i: int, lag: float = 0.0) -> None:
        """Turn ``i`` ended for its client ``lag`` from now: its session's next turn is sent a think time later."""
        if i in next_turn:
            env.process(next_message(next_turn[i], lag))

    def next_message(j: int, lag: float):
        yield env.timeout(lag + float(think_s[j]))  # type: ignore[index]
        if env.now >= until_s:
            return
        sent[j] = env.now
        reached[j] = env.now + float(model.admission_delay_ms(int(prompt[j]))) / 1000.0
        yield from request(j)

    def blocks(tokens: int) -> int:
        return -(-tokens // block)

    def context_keys(i: int, tokens: int) -> list:
        """Keys of the full blocks of request ``i``'s first ``tokens`` tokens: its prompt's, then its answer's (a
        turn's keyed by its session, for the next turn; another request's its own, never asked for again)."""
        prefix = prefixes[i] if prefixes is not None else None
        if isinstance(prefix, SessionHistory):
            return prompt_keys(prefix, i, tokens, block)
        keys = prompt_keys(prefix, i, min(tokens, int(prompt[i])), block)
        return keys + [("answer", i, m) for m in range(int(prompt[i]) // block, tokens // block)]

    signal = {"work": env.event()}

    lag_s = model.output_token_ms / 1000.0

    def request(i: int):
        yield env.timeout(float(model.admission_delay_ms(int(prompt[i]))) / 1000.0)
        depth = sum(len(q) for room in rooms for q in room)
        if not zone_admits(int(tiers[i]), depth, thresholds):
            admitted[i] = False
            turn_over(i)
            return
        room = rooms[route(i)] if routed else rooms[0]
        room[int(tiers[i])].append(i)
        if not signal["work"].triggered:
            signal["work"].succeed()
        yield env.timeout(0)

    def route(i: int) -> int:
        queued = [sum(len(q) for q in room) for room in rooms]
        loads = [len(shown[g]["running"]) + queued[g] for g in range(gpus)]
        free = [load < model.max_num_seqs for load in loads]
        hits = None
        if model.routing is Routing.PREFIX_AFFINITY and caching:
            keys = prompt_keys(None if prefixes is None else prefixes[i], i, int(prompt[i]), block)
            hits = []
            for g in range(gpus):
                resident = shown[g]["users"].keys() | shown[g]["lru"].keys()
                hits.append(next((m for m, key in enumerate(keys) if key not in resident), len(keys)))
        turns[0] += 1
        return choose_replica(model.routing, loads, free, hits, turns[0] - 1)

    def source():
        for i in range(n):
            if follows is not None and follows[i] >= 0:
                continue  # a later turn: sent by its session
            if times[i] > env.now:
                yield env.timeout(times[i] - env.now)
            env.process(request(i))

    def gpu(g: int):
        jitter = StepJitter(model, jitter_seed, g) if model.cycle_jitter else None  # this GPU's step spread
        running: list[_Seq] = []
        kv = 0
        users: dict = {}  # prefix caching: resident keys in use -> how many running sequences use each
        lru: OrderedDict = OrderedDict()  # resident keys nobody uses, least recently used first
        loose = 0  # blocks in use without a key anyone could share
        last_end = -math.inf  # when this GPU's last step ended: a step after idle_after_ms idle pays idle_wake_ms
        shown[g].update(running=running, users=users, lru=lru)
        waiting = rooms[g] if routed else rooms[0]

        def release(seq: _Seq, tokens: int, loose: int) -> int:
            """``seq`` leaves holding ``tokens`` tokens (0: it had not finished its prefill, so it holds only its
            hits): its keys nobody else uses are cached, its answer's full blocks first, then its prompt's from
            the last, so a prefix's first blocks are evicted last. Returns the blocks in use without a key."""
            keyed = seq.keys if tokens else seq.keys[: seq.hits]
            for key in reversed(context_keys(seq.i, tokens)[len(keyed) :] if tokens else []):
                lru[key] = None  # its answer's blocks: from its own (loose) to cached ones
            for key in reversed(keyed):
                users[key] -= 1
                if users[key] == 0:
                    del users[key]
                    lru[key] = None
            return loose - ((seq.held if paged else seq.blocks) - len(keyed))

        while True:
            if paged:  # the decoding sequences' next tokens, in admission order; preempt when no block is free
                for seq in list(running):
                    while seq in running and seq.prefill_left == 0 and seq.held < blocks(seq.context + 1):
                        if (len(users) + loose if caching else kv) < cache_blocks:
                            seq.held += 1
                            kv += 1
                            loose += 1  # (caching: its own block; a cached one nobody uses makes room)
                            while caching and lru and len(users) + loose + len(lru) > cache_blocks:
                                lru.popitem(last=False)
                            continue
                        victim = max(running, key=lambda s: (int(tiers[s.i]), reached[s.i], s.i))
                        running.remove(victim)
                        kv -= victim.held
                        if caching:  # its blocks stay cached, as a finished sequence's do
                            loose = release(victim, victim.context if victim.prefill_left == 0 else 0, loose)
                        victim.held = 0
                        preemptions[victim.i] += 1
                        paused[victim.i] = victim
                        waiting[int(tiers[victim.i])].appendleft(victim.i)
            while len(running) < model.max_num_seqs:
                tier = next((t for t in range(len(waiting)) if waiting[t]), None)
                if tier is None:
                    break
                i = waiting[tier][0]
                seq = _Seq(i, int(prompt[i]), int(output[i]), fill=int(prompt[i]), context=int(prompt[i]))
                if paged:
                    seq = paused.pop(i, seq)
                    seq.context = seq.fill = seq.prefill_left = int(prompt[i]) + seq.emitted
                    if not caching and kv + blocks(seq.context + 1) > cache_blocks:
                        paused[i] = seq
                        break  # the first that does not fit blocks the rest
                    seq.held = blocks(seq.context + 1)
                if caching:  # its context's leading resident blocks are shared (paged: only up to its next token)
                    seq.keys = context_keys(i, seq.context)
                    seq.blocks = seq.held if paged else -(-(int(prompt[i]) + int(output[i])) // block)
                    seq.hits = 0
                    while seq.hits < len(seq.keys) and (seq.keys[seq.hits] in users or seq.keys[seq.hits] in lru):
                        seq.hits += 1
                    back_in_use = sum(1 for key in seq.keys[: seq.hits] if key in lru)
                    if len(users) + loose + back_in_use + seq.blocks - seq.hits > cache_blocks:
                        if paged:
                            paused[i] = seq
                        break  # the first that does not fit blocks the rest
                    for key in seq.keys[: seq.hits]:
                        lru.pop(key, None)
                        users[key] = users.get(key, 0) + 1
                    loose += seq.blocks - seq.hits
                    while lru and len(users) + loose + len(lru) > cache_blocks:
                        lru.popitem(last=False)  # evict the least recently used
                    skipped = min(seq.hits * block, seq.context - 1)
                    if not preemptions[i]:  # what its first admission found, as an engine reports it
                        cached_tokens[i] = skipped
                    seq.fill = seq.prefill_left = seq.context - skipped
                elif kv + prompt[i] + output[i] > kv_budget:
                    break  # the first that does not fit blocks the rest
                waiting[tier].popleft()
                running.append(seq)
                kv += seq.held if paged else int(prompt[i] + output[i])
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
            joining = sum(1 for seq in in_step if seq.chunk and seq.prefill_left == seq.fill)
            # The extended model's context (SPEC section 12): what each decoding sequence holds (prompt and
            # tokens so far), and each chunk against the prompt prefilled before it.
            kv_tokens = sum(int(prompt[seq.i]) + seq.emitted for seq in in_step if not seq.chunk)
            prefill_sq = sum(seq.chunk * seq.chunk for seq in in_step)
            prefill_context = sum(seq.chunk * (seq.context - seq.prefill_left) for seq in in_step)
            spread = float(jitter.take(1)[0]) if jitter is not None else 1.0
            step = model.step_ms(
                prefill, len(in_step), joining,
                kv_tokens=kv_tokens, prefill_sq=prefill_sq, prefill_context=prefill_context,
            )  # fmt: skip
            yield env.timeout((step * spread + model.wake_ms(env.now - last_end)) / 1000.0)
            last_end = env.now
            for seq in in_step:
                if seq.chunk:
                    seq.prefill_left -= seq.chunk
                    if seq.prefill_left > 0:
                        continue  # more chunks to go: no token yet
                    if caching:  # its prompt's blocks are computed: others may share them from now on
                        for key in seq.keys[seq.hits :]:
                            if key not in users:
                                lru.pop(key, None)
                            users[key] = users.get(key, 0) + 1
                        loose -= len(seq.keys) - seq.hits
                seq.emitted += 1
                seq.context += 1  # paged: the token is held from now on
                received = env.now + seq.emitted * lag_s  # the k-th token is k lags behind its step
                if seq.emitted == 1:
                    first_token[seq.i] = received
                else:
                    gaps.append(received - seq.last_token)
                seq.last_token = received
                seq.out_left -= 1
                if seq.out_left == 0:
                    finished[seq.i] = received
                    turn_over(seq.i, received - env.now)
            for seq in [s for s in running if s.out_left == 0]:
                running.remove(seq)
                kv -= seq.held if paged else int(prompt[seq.i] + output[seq.i])
                if caching:
                    loose = release(seq, int(prompt[seq.i] + output[seq.i]), loose)

    env.process(source())
    for g in range(gpus):
        env.process(gpu(g))
    env.run()
    return ReferenceTokens(admitted, first_token, finished, gaps, cached_tokens, preemptions, sent)
