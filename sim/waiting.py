"""The simulator's waiting room: per-tier FIFO queues of request ids, filled lazily through the zones.

Arrivals are a sorted numpy array; nothing happens per arrival. Whenever an engine looks
at the queue at time ``now`` it first admits every arrival up to ``now`` in one go
(:meth:`WaitingQueues.admit_until`): the admission zones are decided for the whole burst
with cumulative sums (:func:`~infer_plan.core.admission.admit_burst`), and each tier's
queue is a slice of a preallocated buffer of ids. Both engines (the batch cycle and
continuous batching) wait here, so they shed and prioritise identically; continuous
batching reads it request by request (:class:`ArrivalQueue`).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from ..core.admission import admit_burst, zone_admits
from ..core.dispatch import EPS, take_by_priority
from ..core.tiers import Tier

__all__ = ["ArrivalQueue", "WaitingQueues"]

_N_TIERS = len(Tier)


class WaitingQueues:
    """Admitted, not yet taken request ids per tier; ``admitted`` marks who got in."""

    def __init__(self, times: np.ndarray, tiers: np.ndarray) -> None:
        self.times = times
        self.tiers = tiers
        self.n = times.size
        self.admitted = np.ones(self.n, dtype=bool)
        self.tier_ids = [np.flatnonzero(tiers == k) for k in range(_N_TIERS)]
        self.tier_pos = [0] * _N_TIERS  # how many of tier_ids[k] have arrived
        self.queue = [np.empty(ids.size, dtype=np.int64) for ids in self.tier_ids]
        self.head = [0] * _N_TIERS
        self.tail = [0] * _N_TIERS
        self.queued = 0
        self.next_arrival = 0
        self.thresholds: tuple[int, int, int] = (1 << 62, 1 << 62, 1 << 62)  # set by the engine from its fleet

    def admit_until(self, now: float) -> None:
        """Admit (or shed) every arrival up to ``now``; depth only grows until the next take."""
        start = self.next_arrival
        stop = int(self.times.searchsorted(now + EPS, side="right"))
        if stop <= start:
            return
        self.next_arrival = stop
        depth = self.queued
        thresholds = self.thresholds
        all_in = depth + (stop - start) <= thresholds[0]
        mask = None if all_in else admit_burst(self.tiers[start:stop], depth, thresholds)[0]
        if mask is not None:
            self.admitted[start:stop] = mask
        tier_pos, tail, queued = self.tier_pos, self.tail, 0
        for k, ids in enumerate(self.tier_ids):
            lo = tier_pos[k]
            hi = int(ids.searchsorted(stop))
            if hi == lo:
                continue
            tier_pos[k] = hi
            chunk = ids[lo:hi] if mask is None else ids[lo:hi][mask[ids[lo:hi] - start]]
            t = tail[k]
            self.queue[k][t : t + chunk.size] = chunk
            tail[k] = t + chunk.size
            queued += chunk.size
        self.queued += queued

    def next_arrival_time(self) -> float:
        return float(self.times[self.next_arrival]) if self.next_arrival < self.n else math.inf

    def oldest_arrival(self) -> float:
        oldest = math.inf
        for k in range(_N_TIERS):
            if self.tail[k] > self.head[k]:
                oldest = min(oldest, self.times[self.queue[k][self.head[k]]])
        return oldest

    def time_queue_reaches(self, need: int, until: float) -> float:
        """When ``need`` more requests will have been admitted, if before ``until``; else inf."""
        start = self.next_arrival
        stop = int(self.times.searchsorted(until + EPS, side="right"))
        if stop - start < need:
            return math.inf
        depth = self.queued
        thresholds = self.thresholds
        if depth + need <= thresholds[0]:
            return float(self.times[start + need - 1])
        mask, _ = admit_burst(self.tiers[start:stop], depth, thresholds)
        counts = np.cumsum(mask)
        if counts[-1] < need:
            return math.inf
        return float(self.times[start + int(np.searchsorted(counts, need))])

    def take(self, n: int) -> list[np.ndarray]:
        """The ``n`` oldest by priority: enterprise first, then paid, then free; FIFO inside a tier."""
        parts: list[np.ndarray] = []
        head, tail = self.head, self.tail
        for k, m in enumerate(take_by_priority((tail[0] - head[0], tail[1] - head[1], tail[2] - head[2]), n)):
            if m:
                h = head[k]
                parts.append(self.queue[k][h : h + m])
                head[k] = h + m
        self.queued -= n
        return parts


class ArrivalQueue:
    """The same waiting room, request by request, for an engine that admits one request at a time.

    Continuous batching admits requests one by one between steps, thousands of times a
    simulated second; there numpy's per-call cost would dominate, so arrivals are read
    from plain lists and each passes the zones (:func:`~infer_plan.core.admission.zone_admits`)
    as it arrives.
    """

    def __init__(self, times: np.ndarray, tiers: np.ndarray) -> None:
        self.times = times
        self.n = times.size
        self._times = times.tolist()
        self._tiers = tiers.tolist()
        self.queues: list[deque[int]] = [deque() for _ in range(_N_TIERS)]
        self.queued = 0
        self.next_arrival = 0
        self.shed: list[int] = []
        self.thresholds: tuple[int, int, int] = (1 << 62, 1 << 62, 1 << 62)  # set by the engine from its fleet
        self.next_time = self._times[0] if self.n else math.inf  # the next arrival's time, read on the hot path

    @property
    def admitted(self) -> np.ndarray:
        admitted = np.ones(self.n, dtype=bool)
        admitted[self.shed] = False
        return admitted

    def admit_until(self, now: float) -> None:
        times, i, n, limit = self._times, self.next_arrival, self.n, now + EPS
        green = self.thresholds[0]
        while i < n and times[i] <= limit:
            tier = self._tiers[i]
            if self.queued < green or zone_admits(tier, self.queued, self.thresholds):  # green admits everyone
                self.queues[tier].append(i)
                self.queued += 1
            else:
                self.shed.append(i)
            i += 1
        self.next_arrival = i
        self.next_time = times[i] if i < n else math.inf

    def pop(self) -> int:
        """The next request by priority: enterprise first, FIFO inside a tier."""
        for queue in self.queues:
            if queue:
                self.queued -= 1
                return queue.popleft()
        raise IndexError("nobody waits")

    def push_back(self, i: int) -> None:
        """Return the request just popped to the head of its tier (it could not be admitted after all)."""
        self.queues[self._tiers[i]].appendleft(i)
        self.queued += 1
