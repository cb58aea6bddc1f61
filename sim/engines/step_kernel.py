"""Continuous batching's step loop compiled with numba: :mod:`.step_engine`'s rule, step for step, in machine code.

The interpreted engine spends a few microseconds of Python on each step; a fleet plan
at a million requests a second takes millions of them. This module is the same loop
over flat arrays (no objects, no SimPy), driven by :mod:`.compiled_steps`, which feeds it
arrivals a window at a time, hands what settles to the sink and samples the monitor.
The rule is :mod:`.step_engine`'s exactly (the tests hold the two to each other request
by request); read that module for the why of each line, this one for the layout.

Layout (``W`` requests in the window, ``G`` GPUs, ``S`` = max_num_seqs):

- ``rf[RT|FIRST|DONE, W]`` float64 and ``ri[TIER|PROMPT|OUTPUT|STATUS|FILL|..., W]`` int64: per request, in joining
  order (``FILL``: the prompt tokens it prefills, less its cached prefix; the rest of the rows are prefix caching's);
- ``queue[tier, W]``: ids waiting per tier, between ``iv[HEAD0 + tier]`` and ``iv[TAIL0 + tier]``;
- ``gi[G, K]`` int64 and ``step_s[G, 2]`` (its step's length, when its last ended): per GPU (the ``G_*`` columns);
- ``pf[PF_ID|PF_LEFT|PF_CHUNK, G, S]``: each GPU's prefilling sequences in admission order;
- ``fin[FIN_STEP|FIN_ID, G, S]``: each GPU's decoding sequences, a heap by (step of the last token, id);
- ``heap_end[G]``, ``heap_gpu[G]``: the GPUs' step ends, a heap by (end, GPU);
- ``runs[R, 3]`` (start, end, sequences) and ``gaps[R, 5]`` (gap s, gaps per tier, end): booked, flushed by the driver;
- ``iv`` / ``fv``: the scalars (``I_*`` / ``F_*``); ``params`` / ``limits``: the model;
- ``kv``: prefix caching's arrays (:mod:`.prefix_kernel`; placeholders when it is off) and ``leave``, the
  sequences leaving a GPU at one step end, released to its cache in the order they were admitted.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from . import prefix_kernel as pk

__all__ = ["admit_until", "advance", "new_state", "rebase"]

EPS = 1e-9  # core.dispatch.EPS: the engines' shared tolerance on simulated clocks

# rf rows, ri rows, statuses
RT, FIRST, DONE = 0, 1, 2
TIER, PROMPT, OUTPUT, STATUS, FILL = 0, 1, 2, 3, 4
GROUP, SHARED_N, HITS, OWN_SEG, ADMITTED_AS, CACHED = 5, 6, 7, 8, 9, 10  # prefix caching: see _admit_cached
RI_ROWS = 11
WAITING, SHED, REFUSED = 0, 1, 2
# gi columns
G_BUSY, G_STEPS_DONE, G_KV, G_RUNNING, G_NDEC, G_DEC0, G_STEPS, G_IDLE, G_PF_N, G_FIN_N = 0, 1, 2, 3, 4, 5, 8, 9, 10, 11
G_COLUMNS = 17  # and prefix_kernel's G_USED .. G_LRU_TAIL
PF_ID, PF_LEFT, PF_CHUNK = 0, 1, 2
FIN_STEP, FIN_ID = 0, 1
# iv scalars
I_NEXT, I_N, I_EXHAUSTED, I_QUEUED, I_HEAP_N, I_IDLE_N, I_RUNS, I_GAPS, HEAD0, TAIL0 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 11
I_SIZE = 17  # and prefix_kernel's I_SEG_FREE, I_RUN_FREE, I_ADMISSIONS
F_NOW = 0
# params (float64) and limits (int64)
P_STEP, P_PREFILL, P_SEQ, P_ADMIT, P_WAKE, P_WAKE_AFTER = 0, 1, 2, 3, 4, 5  # ms
L_MAX_SEQS, L_KV, L_TOKENS, L_GREEN, L_YELLOW, L_RED = 0, 1, 2, 3, 4, 5
L_CACHING, L_BLOCK, L_BLOCKS, L_UNBOUNDED, L_POOL_ROOM = 6, 7, 8, 9, 10  # prefix caching: block tokens, blocks a GPU
L_SIZE = 11
# what advance() returns
NEED_MORE, FLUSH, REACHED, DONE_ALL, GROW = 0, 1, 2, 3, 4

_jit = nb.njit(cache=True, nogil=True)


@_jit
def _zone_admits(tier, depth, limits):  # core.admission.zone_admits: green admits all, yellow sheds free, red paid
    if depth < limits[L_GREEN]:
        return tier <= 2
    if depth < limits[L_YELLOW]:
        return tier <= 1
    if depth < limits[L_RED]:
        return tier <= 0
    return False


@_jit
def admit_until(now, rf, ri, queue, iv, limits):
    """Every arrival up to ``now`` joins its tier's queue or is shed by the zones."""
    i, n, limit = iv[I_NEXT], iv[I_N], now + EPS
    while i < n and rf[RT, i] <= limit:
        tier = ri[TIER, i]
        queued = iv[I_QUEUED]
        if queued < limits[L_GREEN] or _zone_admits(tier, queued, limits):
            queue[tier, iv[TAIL0 + tier]] = i
            iv[TAIL0 + tier] += 1
            iv[I_QUEUED] = queued + 1
        else:
            ri[STATUS, i] = SHED
        i += 1
    iv[I_NEXT] = i


@_jit
def _next_time(rf, iv):
    return rf[RT, iv[I_NEXT]] if iv[I_NEXT] < iv[I_N] else math.inf


@_jit
def _pop(queue, iv):
    for tier in range(3):
        head = iv[HEAD0 + tier]
        if head < iv[TAIL0 + tier]:
            iv[HEAD0 + tier] = head + 1
            iv[I_QUEUED] -= 1
            return queue[tier, head]
    return -1


@_jit
def _push_back(i, queue, ri, iv):
    tier = ri[TIER, i]
    iv[HEAD0 + tier] -= 1
    queue[tier, iv[HEAD0 + tier]] = i
    iv[I_QUEUED] += 1


# -- heaps: the GPUs' step ends by (end, gpu); a GPU's decoding sequences by (last step, id) ------------------------


@_jit
def _heap_push(end, g, heap_end, heap_gpu, iv):
    k = iv[I_HEAP_N]
    iv[I_HEAP_N] = k + 1
    while k > 0:
        parent = (k - 1) >> 1
        pe, pg = heap_end[parent], heap_gpu[parent]
        if pe < end or (pe == end and pg < g):
            break
        heap_end[k], heap_gpu[k] = pe, pg
        k = parent
    heap_end[k], heap_gpu[k] = end, g


@_jit
def _heap_pop(heap_end, heap_gpu, iv):
    top = heap_gpu[0]
    n = iv[I_HEAP_N] - 1
    iv[I_HEAP_N] = n
    end, g = heap_end[n], heap_gpu[n]
    k = 0
    while True:
        child = 2 * k + 1
        if child >= n:
            break
        if child + 1 < n and (
            heap_end[child + 1] < heap_end[child]
            or (heap_end[child + 1] == heap_end[child] and heap_gpu[child + 1] < heap_gpu[child])
        ):
            child += 1
        ce, cg = heap_end[child], heap_gpu[child]
        if end < ce or (end == ce and g < cg):
            break
        heap_end[k], heap_gpu[k] = ce, cg
        k = child
    if n > 0:
        heap_end[k], heap_gpu[k] = end, g
    return top


@_jit
def _fin_push(g, step, i, fin, gi):
    k = gi[g, G_FIN_N]
    gi[g, G_FIN_N] = k + 1
    while k > 0:
        parent = (k - 1) >> 1
        ps, pi = fin[FIN_STEP, g, parent], fin[FIN_ID, g, parent]
        if ps < step or (ps == step and pi < i):
            break
        fin[FIN_STEP, g, k], fin[FIN_ID, g, k] = ps, pi
        k = parent
    fin[FIN_STEP, g, k], fin[FIN_ID, g, k] = step, i


@_jit
def _fin_pop(g, fin, gi):
    top = fin[FIN_ID, g, 0]
    n = gi[g, G_FIN_N] - 1
    gi[g, G_FIN_N] = n
    step, i = fin[FIN_STEP, g, n], fin[FIN_ID, g, n]
    k = 0
    while True:
        child = 2 * k + 1
        if child >= n:
            break
        right = child + 1
        if right < n and (
            fin[FIN_STEP, g, right] < fin[FIN_STEP, g, child]
            or (fin[FIN_STEP, g, right] == fin[FIN_STEP, g, child] and fin[FIN_ID, g, right] < fin[FIN_ID, g, child])
        ):
            child = right
        cs, ci = fin[FIN_STEP, g, child], fin[FIN_ID, g, child]
        if step < cs or (step == cs and i < ci):
            break
        fin[FIN_STEP, g, k], fin[FIN_ID, g, k] = cs, ci
        k = child
    if n > 0:
        fin[FIN_STEP, g, k], fin[FIN_ID, g, k] = step, i
    return top


# -- one GPU: admit, plan a step (or a run of identical ones), end it ----------------------------------------------


@_jit
def _admit(g, now, rf, ri, queue, gi, pf, iv, limits, kv):
    max_seqs, budget = limits[L_MAX_SEQS], limits[L_KV]
    while iv[I_QUEUED] > 0 and gi[g, G_RUNNING] < max_seqs:
        i = _pop(queue, iv)
        if limits[L_CACHING]:
            admitted = _admit_cached(g, i, ri, gi, iv, limits, kv)
            if admitted < 0:  # longer than the whole cache
                ri[STATUS, i] = REFUSED
                rf[DONE, i] = now
                continue
            if admitted == 0:
                _push_back(i, queue, ri, iv)
                return
            k = gi[g, G_PF_N]
            pf[PF_ID, g, k], pf[PF_LEFT, g, k] = i, ri[FILL, i]
            gi[g, G_PF_N] = k + 1
            gi[g, G_RUNNING] += 1
            continue
        reserve = ri[PROMPT, i] + ri[OUTPUT, i]
        if gi[g, G_KV] + reserve > budget:
            if reserve <= budget:
                _push_back(i, queue, ri, iv)  # the first that does not fit blocks the ones behind it
                return
            ri[STATUS, i] = REFUSED  # would never fit, even alone
            rf[DONE, i] = now
            continue
        k = gi[g, G_PF_N]
        pf[PF_ID, g, k], pf[PF_LEFT, g, k] = i, ri[PROMPT, i]
        gi[g, G_PF_N] = k + 1
        gi[g, G_KV] += reserve
        gi[g, G_RUNNING] += 1


# -- prefix caching, a request at a time (step_engine.py's _admit_cached, _end_step and _release_leaving) ----------


@_jit
def _admit_cached(g, i, ri, gi, iv, limits, kv):
    """1: admitted, its leading resident blocks shared; 0: it waits for room; -1: too big for the whole cache."""
    sg, rn, shared, holders, seg_pool, run_pool, _ = kv
    block, capacity = limits[L_BLOCK], limits[L_BLOCKS]
    prompt = ri[PROMPT, i]
    blocks = -(-(prompt + ri[OUTPUT, i]) // block)
    if blocks > capacity:
        return -1
    hits, s, revived = 0, -1, 0
    if ri[SHARED_N, i] > 0:
        s = shared[g, ri[GROUP, i]]
        if s >= 0:
            hits = min(sg[pk.SG_PRESENT, s], ri[SHARED_N, i])
            revived = max(0, hits - sg[pk.SG_IN_USE, s])
    if gi[g, pk.G_USED] + gi[g, pk.G_UNKEYED] + revived + blocks - hits > capacity:
        return 0
    if hits:
        pk.hold(g, s, 0, hits, gi, sg, rn, holders, run_pool, iv)
    gi[g, pk.G_UNKEYED] += blocks - hits
    pk.evict(g, capacity, gi, sg, rn, shared, seg_pool, run_pool, iv)
    skipped = min(hits * block, prompt - 1)
    ri[CACHED, i], ri[FILL, i], ri[HITS, i] = skipped, prompt - skipped, hits
    ri[ADMITTED_AS, i] = iv[pk.I_ADMISSIONS]
    iv[pk.I_ADMISSIONS] += 1
    return 1


@_jit
def _prefilled(g, i, ri, gi, iv, limits, kv):
    """Its prompt's blocks after its hits are computed: resident, the system prompt's shared, the rest its own."""
    sg, rn, shared, holders, seg_pool, run_pool, _ = kv
    n_shared, hits = ri[SHARED_N, i], ri[HITS, i]
    if n_shared > 0:
        group = ri[GROUP, i]
        s = shared[g, group]
        if s < 0:
            s = pk.new_segment(group, sg, seg_pool, iv)
            shared[g, group] = s
        pk.hold(g, s, hits, n_shared, gi, sg, rn, holders, run_pool, iv)
    n_own = ri[PROMPT, i] // limits[L_BLOCK] - n_shared
    if n_own > 0:
        s = pk.new_segment(-1, sg, seg_pool, iv)
        ri[OWN_SEG, i] = s
        pk.hold(g, s, 0, n_own, gi, sg, rn, holders, run_pool, iv)
    gi[g, pk.G_UNKEYED] -= n_shared + n_own - hits


@_jit
def _release(g, i, ri, gi, iv, limits, kv):
    """It finished: its answer's full blocks become a segment of its own, then its blocks nobody else holds are
    cached, its answer's first, its system prompt's last (so a prefix's blocks are evicted last)."""
    sg, rn, shared, holders, seg_pool, run_pool, _ = kv
    block, unbounded = limits[L_BLOCK], limits[L_UNBOUNDED]
    prompt, output = ri[PROMPT, i], ri[OUTPUT, i]
    n_shared = ri[SHARED_N, i]
    n_own = prompt // block - n_shared
    extra = (prompt + output) // block - prompt // block
    held = 0
    if extra > 0:
        s = pk.new_segment(-1, sg, seg_pool, iv)
        pk.hold(g, s, 0, extra, gi, sg, rn, holders, run_pool, iv)
        gi[g, pk.G_UNKEYED] -= extra
        pk.let_go(g, s, extra, unbounded, gi, sg, rn, holders, shared, seg_pool, run_pool, iv)
        held += extra
    if n_own > 0:
        pk.let_go(g, ri[OWN_SEG, i], n_own, unbounded, gi, sg, rn, holders, shared, seg_pool, run_pool, iv)
        held += n_own
    if n_shared > 0:
        s = shared[g, ri[GROUP, i]]
        pk.let_go(g, s, n_shared, unbounded, gi, sg, rn, holders, shared, seg_pool, run_pool, iv)
        held += n_shared
    gi[g, pk.G_UNKEYED] -= -(-(prompt + output) // block) - held


@_jit
def _release_leaving(g, n, ri, gi, iv, limits, kv):
    """The ``n`` sequences that left ``g`` at this step end, in the order they were admitted (the LRU's order)."""
    leave = kv[6]
    for a in range(1, n):  # insertion sort: a step end has a few
        i = leave[a]
        b = a - 1
        while b >= 0 and ri[ADMITTED_AS, leave[b]] > ri[ADMITTED_AS, i]:
            leave[b + 1] = leave[b]
            b -= 1
        leave[b + 1] = i
    for a in range(n):
        _release(g, leave[a], ri, gi, iv, limits, kv)


@_jit
def _plan(g, now, rf, ri, queue, gi, step_s, pf, fin, heap_end, heap_gpu, runs, iv, params, limits, kv):
    if iv[I_QUEUED] > 0 and gi[g, G_RUNNING] < limits[L_MAX_SEQS]:
        _admit(g, now, rf, ri, queue, gi, pf, iv, limits, kv)
    if gi[g, G_RUNNING] == 0:
        gi[g, G_BUSY] = 0
        gi[g, G_IDLE] = 1
        iv[I_IDLE_N] += 1
        return
    if gi[g, G_PF_N] > 0:
        sequences, prefill, joining, budget = gi[g, G_NDEC], 0, 0, limits[L_TOKENS]
        for k in range(gi[g, G_PF_N]):
            left = pf[PF_LEFT, g, k]
            chunk = left if left < budget else budget
            pf[PF_CHUNK, g, k] = chunk
            budget -= chunk
            prefill += chunk
            if chunk > 0:
                sequences += 1
                if left == ri[FILL, pf[PF_ID, g, k]]:
                    joining += 1
        length = (
            params[P_STEP] + params[P_PREFILL] * prefill + params[P_SEQ] * sequences + params[P_ADMIT] * joining
        ) / 1000.0
        idle = now - step_s[g, 1]
        if params[P_WAKE] > 0 and idle > 0 and idle * 1000.0 >= params[P_WAKE_AFTER]:
            length += params[P_WAKE] / 1000.0  # a step that starts an idle engine (ServiceModel.wake_ms)
        steps = 1
    else:  # pure decode: skip ahead to the next finish, or to the next arrival it could admit
        length = (params[P_STEP] + params[P_SEQ] * gi[g, G_NDEC]) / 1000.0
        steps = fin[FIN_STEP, g, 0] - gi[g, G_STEPS_DONE]
        if steps > 1 and gi[g, G_RUNNING] < limits[L_MAX_SEQS] and length > 0:
            if iv[I_QUEUED] > 0 and gi.shape[0] > 1:
                steps = 1  # the head waits for KV room: another GPU may take it (step_engine.py's _plan)
            else:
                arrival = _next_time(rf, iv)
                if arrival < math.inf:
                    steps = min(steps, max(1, math.ceil((arrival - now) / length - EPS)))
    gi[g, G_BUSY] = 1
    step_s[g, 0] = length
    gi[g, G_STEPS] = steps
    end = now + length * steps
    r = iv[I_RUNS]
    runs[r, 0], runs[r, 1], runs[r, 2] = now, end, gi[g, G_RUNNING]
    iv[I_RUNS] = r + 1
    _heap_push(end, g, heap_end, heap_gpu, iv)


@_jit
def _end_step(g, now, rf, ri, gi, step_s, pf, fin, gaps, iv, limits, kv):
    caching, leave, leaving = limits[L_CACHING], kv[6], 0
    steps = gi[g, G_STEPS]
    done = gi[g, G_STEPS_DONE] + steps
    gi[g, G_STEPS_DONE] = done
    gi[g, G_BUSY] = 0
    step_s[g, 1] = now
    if gi[g, G_NDEC] > 0:  # every decoding sequence emitted `steps` tokens, one step apart
        q = iv[I_GAPS]
        gaps[q, 0] = step_s[g, 0]
        for tier in range(3):
            gaps[q, 1 + tier] = gi[g, G_DEC0 + tier] * steps
        gaps[q, 4] = now
        iv[I_GAPS] = q + 1
    if gi[g, G_PF_N] > 0:
        keep = 0
        for k in range(gi[g, G_PF_N]):
            i = pf[PF_ID, g, k]
            left = pf[PF_LEFT, g, k] - pf[PF_CHUNK, g, k]
            if left != 0:
                pf[PF_ID, g, keep], pf[PF_LEFT, g, keep] = i, left
                keep += 1
                continue
            rf[FIRST, i] = now  # the last prompt chunk emits the first token
            if caching:
                _prefilled(g, i, ri, gi, iv, limits, kv)
            if ri[OUTPUT, i] == 1:
                rf[DONE, i] = now
                gi[g, G_RUNNING] -= 1
                if caching:
                    leave[leaving] = i
                    leaving += 1
                else:
                    gi[g, G_KV] -= ri[PROMPT, i] + ri[OUTPUT, i]
                continue
            _fin_push(g, done + ri[OUTPUT, i] - 1, i, fin, gi)
            gi[g, G_DEC0 + ri[TIER, i]] += 1
            gi[g, G_NDEC] += 1
        gi[g, G_PF_N] = keep
    while gi[g, G_FIN_N] > 0 and fin[FIN_STEP, g, 0] <= done:
        i = _fin_pop(g, fin, gi)
        gi[g, G_DEC0 + ri[TIER, i]] -= 1
        rf[DONE, i] = now
        gi[g, G_RUNNING] -= 1
        gi[g, G_NDEC] -= 1
        if caching:
            leave[leaving] = i
            leaving += 1
        else:
            gi[g, G_KV] -= ri[PROMPT, i] + ri[OUTPUT, i]
    if leaving:
        _release_leaving(g, leaving, ri, gi, iv, limits, kv)


# -- the loop --------------------------------------------------------------------------------------------------------


@_jit
def advance(
    t_from, t_limit, rf, ri, queue, gi, step_s, pf, fin, heap_end, heap_gpu, runs, gaps, iv, fv, params, limits, kv
):
    """Run every event before ``t_limit``; stop early when more arrivals, or room for the booked runs, are needed.

    Returns NEED_MORE (load arrivals past the next event), FLUSH (hand over runs and gaps), REACHED (the next event
    is at or after ``t_limit``: the monitor's turn), GROW (prefix caching's pools may not hold one more moment's
    segments and runs) or DONE_ALL (every arrival loaded and served).
    """
    gpus = gi.shape[0]
    room = runs.shape[0] - gpus - 1
    fv[F_NOW] = max(fv[F_NOW], t_from)
    while True:
        event = heap_end[0] if iv[I_HEAP_N] > 0 else math.inf
        if iv[I_IDLE_N] > 0:
            pickup = fv[F_NOW] if iv[I_QUEUED] > 0 else _next_time(rf, iv)
            event = min(event, pickup)
        n = iv[I_N]
        if iv[I_EXHAUSTED] == 0 and (n == 0 or event + EPS >= rf[RT, n - 1]):
            return NEED_MORE
        if event == math.inf:
            return DONE_ALL
        if event >= t_limit:
            return REACHED
        if iv[I_RUNS] > room or iv[I_GAPS] > room:
            return FLUSH
        if limits[L_CACHING] and min(iv[pk.I_SEG_FREE], iv[pk.I_RUN_FREE]) < limits[L_POOL_ROOM]:
            return GROW
        # -- every event at this moment: arrivals, then the steps ending now by GPU, then idle GPUs pick up
        now = event
        fv[F_NOW] = now
        limit = now + EPS
        if iv[I_NEXT] < n and rf[RT, iv[I_NEXT]] <= limit:
            admit_until(now, rf, ri, queue, iv, limits)
        while iv[I_HEAP_N] > 0 and heap_end[0] <= limit:
            g = _heap_pop(heap_end, heap_gpu, iv)
            _end_step(g, now, rf, ri, gi, step_s, pf, fin, gaps, iv, limits, kv)
            _plan(g, now, rf, ri, queue, gi, step_s, pf, fin, heap_end, heap_gpu, runs, iv, params, limits, kv)
        if iv[I_IDLE_N] > 0 and iv[I_QUEUED] > 0:
            for g in range(gpus):
                if gi[g, G_IDLE] == 1 and iv[I_QUEUED] > 0:
                    gi[g, G_IDLE] = 0
                    iv[I_IDLE_N] -= 1
                    _plan(g, now, rf, ri, queue, gi, step_s, pf, fin, heap_end, heap_gpu, runs, iv, params, limits, kv)


@_jit
def rebase(cut, rf, ri, queue, gi, pf, fin, iv):
    """Drop the window's first ``cut`` requests (all settled and handed over): every id held moves down by ``cut``."""
    n = iv[I_N]
    rf[:, : n - cut] = rf[:, cut:n].copy()
    ri[:, : n - cut] = ri[:, cut:n].copy()
    for tier in range(3):
        head, tail = iv[HEAD0 + tier], iv[TAIL0 + tier]
        for k in range(head, tail):
            queue[tier, k - head] = queue[tier, k] - cut
        iv[HEAD0 + tier], iv[TAIL0 + tier] = 0, tail - head
    for g in range(gi.shape[0]):
        for k in range(gi[g, G_PF_N]):
            pf[PF_ID, g, k] -= cut
        for k in range(gi[g, G_FIN_N]):
            fin[FIN_ID, g, k] -= cut
    iv[I_NEXT] -= cut
    iv[I_N] = n - cut


def new_state(gpus: int, max_seqs: int, window: int, booked: int) -> dict[str, np.ndarray]:
    """Zeroed arrays for ``gpus`` GPUs, a window of ``window`` requests and ``booked`` runs and gaps."""
    gi = np.zeros((gpus, G_COLUMNS), np.int64)
    gi[:, G_IDLE] = 1
    iv = np.zeros(I_SIZE, np.int64)
    iv[I_IDLE_N] = gpus
    return {
        "rf": np.full((3, window), np.nan),
        "ri": np.zeros((RI_ROWS, window), np.int64),
        "queue": np.zeros((3, window), np.int64),
        "gi": gi,
        "step_s": np.column_stack([np.zeros(gpus), np.full(gpus, -np.inf)]),  # each GPU's step; its last end
        "pf": np.zeros((3, gpus, max_seqs), np.int64),
        "fin": np.zeros((2, gpus, max_seqs), np.int64),
        "heap_end": np.zeros(gpus),
        "heap_gpu": np.zeros(gpus, np.int64),
        "runs": np.zeros((booked, 3)),
        "gaps": np.zeros((booked, 5)),
        "iv": iv,
        "fv": np.zeros(1),
    }
