"""Prefix caching in the compiled step loop: :class:`~infer_plan.core.prefix_cache.PrefixCache`'s rule over flat arrays.

The interpreted engine keeps each GPU's cache as Python objects (segments in a dict, runs
in an ``OrderedDict``), some tens of microseconds a request; a fleet plan for a chat
service runs millions of them. This module is the same rule, operation for operation, for
the workloads whose prompts are a shared system prompt and the request's own text
(``--shared-prefix``): the request's own blocks and its answer's are segments nobody else
ever holds, the system prompt's is shared. Read ``core/prefix_cache.py`` for the why of
each rule; the tests hold the two request by request.

Layout (``K`` segment slots, ``R`` run slots, each a pool with a free stack):

- ``sg[SG_*, K]``: a resident segment: blocks present, blocks in use, the longest prefix a
  holder holds (0: none), its runs (first = oldest, last = newest), its system prompt (-1: a
  request's own);
- ``rn[R_*, R]``: a run of cached blocks ``[lo, hi)`` of a segment, linked in its GPU's LRU
  (``R_PREV``/``R_NEXT``, oldest first from ``gi[g, G_LRU_HEAD]``) and in its segment's runs;
- ``shared[g, group]``: the slot of system prompt ``group`` on GPU ``g`` (-1: none resident);
- ``holders[g, group, n]``: the sequences holding its first ``n`` blocks (a request's own
  segment has one holder, so ``SG_MAXH`` alone says it);
- ``gi[g, G_USED | G_CACHED | G_UNKEYED]``: :class:`PrefixCache`'s three counts.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# sg rows
SG_PRESENT, SG_IN_USE, SG_MAXH, SG_FIRST, SG_LAST, SG_GROUP = 0, 1, 2, 3, 4, 5
SG_ROWS = 6
# rn rows
R_SEG, R_LO, R_HI, R_PREV, R_NEXT, R_SPREV, R_SNEXT = 0, 1, 2, 3, 4, 5, 6
R_ROWS = 7
# gi columns (after step_kernel's own)
G_USED, G_CACHED, G_UNKEYED, G_LRU_HEAD, G_LRU_TAIL = 12, 13, 14, 15, 16
# iv scalars (after step_kernel's own)
I_SEG_FREE, I_RUN_FREE, I_ADMISSIONS = 14, 15, 16

_jit = nb.njit(cache=True, nogil=True)


# -- the pools ---------------------------------------------------------------------------------------------------


@_jit
def new_segment(group, sg, seg_pool, iv):
    k = iv[I_SEG_FREE] - 1
    iv[I_SEG_FREE] = k
    s = seg_pool[k]
    sg[SG_PRESENT, s] = 0
    sg[SG_IN_USE, s] = 0
    sg[SG_MAXH, s] = 0
    sg[SG_FIRST, s] = -1
    sg[SG_LAST, s] = -1
    sg[SG_GROUP, s] = group
    return s


@_jit
def _free_segment(g, s, sg, shared, seg_pool, iv):
    group = sg[SG_GROUP, s]
    if group >= 0:
        shared[g, group] = -1
    seg_pool[iv[I_SEG_FREE]] = s
    iv[I_SEG_FREE] += 1


@_jit
def _new_run(g, s, lo, hi, gi, sg, rn, run_pool, iv):
    """A run of ``s``'s blocks [lo, hi), the newest of its segment and of its GPU's LRU."""
    k = iv[I_RUN_FREE] - 1
    iv[I_RUN_FREE] = k
    r = run_pool[k]
    rn[R_SEG, r], rn[R_LO, r], rn[R_HI, r] = s, lo, hi
    tail = gi[g, G_LRU_TAIL]
    rn[R_PREV, r], rn[R_NEXT, r] = tail, -1
    if tail >= 0:
        rn[R_NEXT, tail] = r
    else:
        gi[g, G_LRU_HEAD] = r
    gi[g, G_LRU_TAIL] = r
    last = sg[SG_LAST, s]
    rn[R_SPREV, r], rn[R_SNEXT, r] = last, -1
    if last >= 0:
        rn[R_SNEXT, last] = r
    else:
        sg[SG_FIRST, s] = r
    sg[SG_LAST, s] = r


@_jit
def _drop_run(g, r, gi, sg, rn, run_pool, iv):
    """Unlink run ``r`` from its GPU's LRU and its segment's runs, and free its slot."""
    prev, nxt = rn[R_PREV, r], rn[R_NEXT, r]
    if prev >= 0:
        rn[R_NEXT, prev] = nxt
    else:
        gi[g, G_LRU_HEAD] = nxt
    if nxt >= 0:
        rn[R_PREV, nxt] = prev
    else:
        gi[g, G_LRU_TAIL] = prev
    s = rn[R_SEG, r]
    prev, nxt = rn[R_SPREV, r], rn[R_SNEXT, r]
    if prev >= 0:
        rn[R_SNEXT, prev] = nxt
    else:
        sg[SG_FIRST, s] = nxt
    if nxt >= 0:
        rn[R_SPREV, nxt] = prev
    else:
        sg[SG_LAST, s] = prev
    run_pool[iv[I_RUN_FREE]] = r
    iv[I_RUN_FREE] += 1


# -- holders -------------------------------------------------------------------------------------------------------


@_jit
def _add_holder(g, s, n, sg, holders):
    group = sg[SG_GROUP, s]
    if group >= 0:
        holders[g, group, n] += 1
    sg[SG_MAXH, s] = max(sg[SG_MAXH, s], n)


@_jit
def _drop_holder(g, s, n, sg, holders):
    group = sg[SG_GROUP, s]
    if group < 0:  # a request's own segment: its one holder
        sg[SG_MAXH, s] = 0
        return
    holders[g, group, n] -= 1
    if n == sg[SG_MAXH, s] and holders[g, group, n] == 0:
        m = n - 1
        while m > 0 and holders[g, group, m] == 0:
            m -= 1
        sg[SG_MAXH, s] = m


# -- PrefixCache's operations on one segment -------------------------------------------------------------------------


@_jit
def hold(g, s, before, now, gi, sg, rn, holders, run_pool, iv):
    """A sequence that held the first ``before`` blocks of ``s`` now holds the first ``now`` (``_hold``)."""
    if before:
        _drop_holder(g, s, before, sg, holders)
    _add_holder(g, s, now, sg, holders)
    in_use = sg[SG_IN_USE, s]
    if now <= in_use:
        return
    revive = min(now, sg[SG_PRESENT, s]) - in_use  # cached blocks held again: the newest runs, from their bottom
    while revive > 0:
        r = sg[SG_LAST, s]
        take = min(revive, rn[R_HI, r] - rn[R_LO, r])
        rn[R_LO, r] += take
        revive -= take
        gi[g, G_CACHED] -= take
        if rn[R_LO, r] == rn[R_HI, r]:
            _drop_run(g, r, gi, sg, rn, run_pool, iv)
    gi[g, G_USED] += now - in_use
    sg[SG_IN_USE, s] = now
    sg[SG_PRESENT, s] = max(sg[SG_PRESENT, s], now)


@_jit
def let_go(g, s, held, unbounded, gi, sg, rn, holders, shared, seg_pool, run_pool, iv):
    """A sequence holding ``held`` blocks of ``s`` leaves: the blocks nobody holds now become one cached run
    (``_let_go``). With no KV limit nothing is ever evicted, so a request's own blocks, which nobody can find
    again, are freed instead of cached: the same answers, in bounded memory."""
    _drop_holder(g, s, held, sg, holders)
    still, in_use = sg[SG_MAXH, s], sg[SG_IN_USE, s]
    if still >= in_use:
        return
    gi[g, G_USED] -= in_use - still
    sg[SG_IN_USE, s] = still
    if unbounded and sg[SG_GROUP, s] < 0:
        _free_segment(g, s, sg, shared, seg_pool, iv)
        return
    _new_run(g, s, still, in_use, gi, sg, rn, run_pool, iv)
    gi[g, G_CACHED] += in_use - still


@_jit
def evict(g, capacity, gi, sg, rn, shared, seg_pool, run_pool, iv):
    """Cached blocks past the capacity go, the oldest run first, from its last block down (``_evict``)."""
    over = gi[g, G_USED] + gi[g, G_UNKEYED] + gi[g, G_CACHED] - capacity
    while over > 0 and gi[g, G_LRU_HEAD] >= 0:
        r = gi[g, G_LRU_HEAD]
        s = rn[R_SEG, r]
        take = min(over, rn[R_HI, r] - rn[R_LO, r])
        rn[R_HI, r] -= take
        sg[SG_PRESENT, s] = rn[R_HI, r]
        gi[g, G_CACHED] -= take
        over -= take
        if rn[R_LO, r] == rn[R_HI, r]:
            _drop_run(g, r, gi, sg, rn, run_pool, iv)
            if sg[SG_PRESENT, s] == 0 and sg[SG_MAXH, s] == 0:
                _free_segment(g, s, sg, shared, seg_pool, iv)


# -- the arrays, made and grown by the driver (numba cannot grow an array it was handed) ----------------------------


def new_cache(gpus: int, max_seqs: int, caching: bool) -> dict[str, np.ndarray]:
    """Empty pools for ``gpus`` GPUs (one-slot placeholders when prefix caching is off: the loop's types stay)."""
    slots = 4 * pool_room(gpus, max_seqs) if caching else 1
    return {
        "sg": np.zeros((SG_ROWS, slots), np.int64),
        "rn": np.zeros((R_ROWS, slots), np.int64),
        "shared": np.full((gpus, 1), -1, np.int64),
        "holders": np.zeros((gpus, 1, 1), np.int64),
        "seg_pool": np.arange(slots, dtype=np.int64),
        "run_pool": np.arange(slots, dtype=np.int64),
        "leave": np.zeros(max_seqs, np.int64),
    }


def pool_room(gpus: int, max_seqs: int) -> int:
    """Segment and run slots one moment can take: each GPU's step end releases up to ``max_seqs`` sequences, each
    taking an answer segment and caching up to three runs, and admits as many, each with a segment of its own."""
    return gpus * (3 * max_seqs + 2)


def fit_groups(cache: dict[str, np.ndarray], groups: int, longest: int) -> None:
    """Make room for system prompts ``0 .. groups - 1`` of up to ``longest`` blocks."""
    shared, holders = cache["shared"], cache["holders"]
    if groups > shared.shape[1]:
        grown = np.full((shared.shape[0], groups), -1, np.int64)
        grown[:, : shared.shape[1]] = shared
        cache["shared"] = grown
    if groups > holders.shape[1] or longest + 1 > holders.shape[2]:
        shape = (holders.shape[0], max(groups, holders.shape[1]), max(longest + 1, holders.shape[2]))
        grown = np.zeros(shape, np.int64)
        grown[:, : holders.shape[1], : holders.shape[2]] = holders
        cache["holders"] = grown


def grow_pools(cache: dict[str, np.ndarray], iv: np.ndarray) -> None:
    """Double both pools, the new slots free."""
    for rows, pool, free in (("sg", "seg_pool", I_SEG_FREE), ("rn", "run_pool", I_RUN_FREE)):
        old = cache[rows]
        size = old.shape[1]
        grown = np.zeros((old.shape[0], 2 * size), np.int64)
        grown[:, :size] = old
        cache[rows] = grown
        slots = np.zeros(2 * size, np.int64)
        held = int(iv[free])
        slots[:held] = cache[pool][:held]
        slots[held : held + size] = np.arange(size, 2 * size)
        cache[pool] = slots
        iv[free] = held + size
