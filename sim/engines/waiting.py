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

import bisect
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from ...core.admission import admit_burst, zone_admits
from ...core.dispatch import EPS, take_by_priority
from ...core.tiers import Tier
from ..inputs.arrivals import Arrivals, concatenate

__all__ = ["ArrivalQueue", "RoutedArrivalQueue", "SessionPlan", "SessionTurns", "WaitingQueues", "session_queue"]

_N_TIERS = len(Tier)


class WaitingQueues:
    """Admitted, not yet taken request ids per tier; ``admitted`` marks who got in.

    Arrivals come in chunks (time slices) and are loaded as far ahead as the dispatcher
    looks. Each load first drops the rows nothing can change any more (answered or
    shed, and older than the fleet's look-back) after handing them to ``fold``, so a
    run holds the queue and about one chunk, whatever its length. Ids are local row
    numbers; ``offset`` is the global number of row 0.
    """

    LOAD_REQUESTS = 1 << 15

    def __init__(self, chunks: Iterable[Arrivals], columns: dict[str, tuple[type, object]] | None = None) -> None:
        self.chunks = iter(chunks)
        self.exhausted = False
        self.times = np.empty(0)
        self.tiers = np.empty(0, dtype=np.int8)
        self.prompt_tokens: np.ndarray | None = None
        self.output_tokens: np.ndarray | None = None
        self.admitted = np.ones(0, dtype=bool)
        self.column_kinds = columns or {}  # the engine's own per-request columns: name -> (dtype, fill)
        self.cols = SimpleNamespace(**{name: np.empty(0, dtype) for name, (dtype, _) in self.column_kinds.items()})
        self.n = 0
        self.offset = 0
        self.tier_ids = [np.empty(0, np.int64) for _ in range(_N_TIERS)]
        self.tier_pos = [0] * _N_TIERS  # how many of tier_ids[k] have arrived
        self.tier_cum = np.zeros((_N_TIERS, 1), np.int64)  # [k, i]: tier k's rows among [cum_from, cum_from + i)
        self.cum_from = 0
        self.tier_before = [0] * _N_TIERS
        self.queue = [np.empty(0, dtype=np.int64) for _ in range(_N_TIERS)]
        self.head = [0] * _N_TIERS
        self.tail = [0] * _N_TIERS
        self.queued = 0
        self.next_arrival = 0
        self.thresholds: tuple[int, int, int] = (1 << 62, 1 << 62, 1 << 62)  # set by the engine from its fleet
        self.now = 0.0
        self.lookback_s = 0.0  # the fleet counts arrivals this far back
        self.fold: Callable[[int], None] | None = None  # hand rows [0, cut) over before they are dropped
        self.pinned: Callable[[], int] | None = None  # the lowest row the engine still needs (a running batch)
        self.on_rebase: Callable[[int], None] | None = None  # the engine shifts the ids it holds
        self.stop = False  # set by ``fold``'s owner: the run has measured enough, load no more

    # -- loading and forgetting ---------------------------------------------------------

    def _ensure(self, until: float) -> None:
        """Load chunks until every arrival at or before ``until`` is loaded."""
        while not self.exhausted and (self.n == 0 or self.times[-1] <= until + EPS):
            self._load_next()

    def _load_next(self) -> None:
        """Load the next chunks, at least ``LOAD_REQUESTS`` requests of them where there are that many.

        At a low rate one chunk (a second) holds a few hundred requests, and each load
        costs a fold, a rebase and a settlement of fixed size; taking several seconds at
        once keeps that cost per request small. Memory stays bounded by the larger of a
        chunk and this count.
        """
        chunk = None if self.stop else next(self.chunks, None)
        if chunk is None:
            self.exhausted = True
            return
        gathered, size = [chunk], len(chunk)
        while size < self.LOAD_REQUESTS and (more := next(self.chunks, None)) is not None:
            gathered.append(more)
            size += len(more)
        self._forget()
        self._append(gathered[0] if len(gathered) == 1 else concatenate(gathered))

    def _forget(self) -> None:
        """Fold and drop the rows no one needs any more."""
        heads = [int(self.queue[k][self.head[k]]) for k in range(_N_TIERS) if self.tail[k] > self.head[k]]
        cut = min(self.next_arrival, *heads, int(self.times.searchsorted(self.now - self.lookback_s - EPS)))
        if self.pinned is not None:
            cut = min(cut, self.pinned())
        if cut <= 0:
            return
        if self.fold is not None:
            self.fold(cut)
        self._rebase(cut)

    def _rebase(self, cut: int) -> None:
        self.offset += cut
        self.times, self.tiers, self.admitted = self.times[cut:], self.tiers[cut:], self.admitted[cut:]
        if self.prompt_tokens is not None and self.output_tokens is not None:
            self.prompt_tokens, self.output_tokens = self.prompt_tokens[cut:], self.output_tokens[cut:]
        for name in self.column_kinds:
            setattr(self.cols, name, getattr(self.cols, name)[cut:])
        for k in range(_N_TIERS):
            self.queue[k] = self.queue[k][self.head[k] : self.tail[k]] - cut
            self.head[k], self.tail[k] = 0, self.queue[k].size
        self.next_arrival -= cut
        self.n -= cut
        if self.on_rebase is not None:
            self.on_rebase(cut)

    def _append(self, chunk: Arrivals) -> None:
        m = len(chunk)
        if m == 0:
            return
        self.times = np.concatenate((self.times, chunk.times))
        self.tiers = np.concatenate((self.tiers, chunk.tiers))
        self.admitted = np.concatenate((self.admitted, np.ones(m, dtype=bool)))
        if chunk.has_tokens:
            assert chunk.prompt_tokens is not None and chunk.output_tokens is not None
            if self.prompt_tokens is None or self.output_tokens is None:
                self.prompt_tokens, self.output_tokens = chunk.prompt_tokens, chunk.output_tokens
            else:
                self.prompt_tokens = np.concatenate((self.prompt_tokens, chunk.prompt_tokens))
                self.output_tokens = np.concatenate((self.output_tokens, chunk.output_tokens))
        for name, (dtype, fill) in self.column_kinds.items():
            setattr(self.cols, name, np.concatenate((getattr(self.cols, name), np.full(m, fill, dtype=dtype))))
        self.n += m
        # Per tier, how many rows from next_arrival on are of that tier: admit_until reads its burst's
        # per-tier counts off this table. Rows before next_arrival are admitted already, so it covers
        # about one load, not the look-back the waiting room also keeps.
        self.cum_from = self.next_arrival
        self.tier_cum = np.zeros((_N_TIERS, self.n - self.cum_from + 1), np.int64)
        for k in range(_N_TIERS):
            self.tier_ids[k] = np.flatnonzero(self.tiers == k)
            self.tier_pos[k] = int(self.tier_ids[k].searchsorted(self.next_arrival))
            np.cumsum(self.tiers[self.cum_from :] == k, out=self.tier_cum[k, 1:])
            live = self.queue[k][self.head[k] : self.tail[k]]
            buffer = np.empty(live.size + self.tier_ids[k].size - self.tier_pos[k], dtype=np.int64)
            buffer[: live.size] = live
            self.queue[k], self.head[k], self.tail[k] = buffer, 0, live.size
        self.tier_before = list(self.tier_pos)  # rows of each tier before cum_from

    def arrivals_between(self, start: float, end: float) -> int:
        """Arrivals in [start, end) (the fleet's rate estimates; start within its look-back)."""
        self._ensure(end)
        lo, hi = self.times.searchsorted([start, end])
        return int(hi - lo)

    # -- the queue ----------------------------------------------------------------------

    def admit_until(self, now: float) -> None:
        """Admit (or shed) every arrival up to ``now``; depth only grows until the next take."""
        self.now = now
        self._ensure(now)
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
        arrived, before = self.tier_cum[:, stop - self.cum_from].tolist(), self.tier_before
        for k, ids in enumerate(self.tier_ids):
            lo = tier_pos[k]
            hi = before[k] + arrived[k]
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
        if self.next_arrival >= self.n:
            self._ensure(self.times[-1] if self.n else 0.0)
        return float(self.times[self.next_arrival]) if self.next_arrival < self.n else math.inf

    @property
    def drained(self) -> bool:
        """Every arrival loaded and admitted or shed, nobody waiting."""
        if self.next_arrival >= self.n:
            self._ensure(self.times[-1] if self.n else 0.0)
        return self.exhausted and self.next_arrival >= self.n and self.queued == 0

    def oldest_arrival(self) -> float:
        oldest = math.inf
        for k in range(_N_TIERS):
            if self.tail[k] > self.head[k]:
                oldest = min(oldest, self.times[self.queue[k][self.head[k]]])
        return oldest

    def time_queue_reaches(self, need: int, until: float) -> float:
        """When ``need`` more requests will have been admitted, if before ``until``; else inf.

        Loads chunks only as far as the answer needs: a time found among the loaded
        arrivals is final, since every earlier arrival is loaded too.
        """
        while True:
            found = self._reaches(need, until)
            if found < math.inf or self.exhausted or (self.n and self.times[-1] > until + EPS):
                return found
            self._load_next()

    def _reaches(self, need: int, until: float) -> float:
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

    def arrivals_between(self, start: float, end: float) -> int:
        """Arrivals in [start, end) (the fleet's rate estimates)."""
        lo, hi = self.times.searchsorted([start, end])
        return int(hi - lo)

    @property
    def admitted(self) -> np.ndarray:
        admitted = np.ones(self.times.size, dtype=bool)
        admitted[self.shed] = False
        return admitted

    @property
    def exhausted(self) -> bool:
        """Every arrival has come (admitted or shed)."""
        return self.next_arrival >= self.n

    def admit_until(self, now: float) -> None:
        times, i, n, limit = self._times, self.next_arrival, self.n, now + EPS
        green = self.thresholds[0]
        while i < n and times[i] <= limit:
            tier = self._tiers[i]
            if self.queued < green or zone_admits(tier, self.queued, self.thresholds):  # green admits everyone
                self._enqueue(i, tier)
            else:
                self.shed.append(i)
            i += 1
        self.next_arrival = i
        self.next_time = times[i] if i < n else math.inf

    def _enqueue(self, i: int, tier: int) -> None:
        self.queues[tier].append(i)
        self.queued += 1

    def pop(self, g: int = 0) -> int:
        """The next request by priority: enterprise first, FIFO inside a tier (``g``: the GPU asking; one room)."""
        for queue in self.queues:
            if queue:
                self.queued -= 1
                return queue.popleft()
        raise IndexError("nobody waits")

    def push_back(self, i: int, g: int = 0) -> None:
        """Return the request just popped to the head of its tier (it could not be admitted after all)."""
        self.queues[self._tiers[i]].appendleft(i)
        self.queued += 1


class RoutedArrivalQueue(ArrivalQueue):
    """Arrivals routed at arrival to one GPU's own waiting room (``routing`` other than shared_queue).

    The zones still judge the fleet's whole waiting depth (``queued``), as the gateway
    that routes sees it; ``route(i)`` is asked in arrival order, with the engine's state at
    the last step end, which is its state at the arrival: nothing changes between steps.

    The fleet changes as the server's pool does (``server/queues/routed_queue.py``): a GPU
    that stops taking work (failed, released) has what waits for it routed again among
    those that take work, in tier and arrival order, each to the back of its new queue;
    while none takes work (``route`` answers -1) arrivals wait in the shared room, the base
    class's queues, and are routed when a GPU comes up. No admitted request is lost with
    its GPU's queue.
    """

    def __init__(self, times: np.ndarray, tiers: np.ndarray, gpus: int, route: Callable[[int], int]) -> None:
        super().__init__(times, tiers)
        self.route = route
        self.own: list[list[deque[int]]] = [[deque() for _ in range(_N_TIERS)] for _ in range(gpus)]
        self.own_queued = [0] * gpus

    def _enqueue(self, i: int, tier: int) -> None:
        g = self.route(i)
        if g < 0:  # no GPU takes work now: the shared room, until one does
            self.queues[tier].append(i)
        else:
            self.own[g][tier].append(i)
            self.own_queued[g] += 1
        self.queued += 1

    def add_gpu(self) -> None:
        """A GPU joined the fleet (it takes work once it is up)."""
        self.own.append([deque() for _ in range(_N_TIERS)])
        self.own_queued.append(0)

    def close(self, g: int) -> None:
        """GPU ``g`` takes nothing new: what waits for it is routed again (``route`` no longer offers it)."""
        self.own_queued[g] = 0
        self._route_again(self.own[g])

    def reopen(self) -> None:
        """A GPU came up: what waited for one in the shared room is routed."""
        self._route_again(self.queues)

    def _route_again(self, room: list[deque[int]]) -> None:
        for tier, queue in enumerate(room):
            waiting = list(queue)
            queue.clear()
            self.queued -= len(waiting)
            for i in waiting:
                self._enqueue(i, tier)

    def pop(self, g: int = 0) -> int:
        for queue in self.own[g]:
            if queue:
                self.queued -= 1
                self.own_queued[g] -= 1
                return queue.popleft()
        raise IndexError("nobody waits here")

    def push_back(self, i: int, g: int = 0) -> None:
        self.own[g][self._tiers[i]].appendleft(i)
        self.own_queued[g] += 1
        self.queued += 1


class SessionPlan(NamedTuple):
    """A run's sessions in the engine's order of requests (see :class:`SessionTurns`)."""

    follows_me: list[int]  # the turn sent after each one ends; -1: none
    think_s: list[float]  # from the end of the turn before to the send
    delay_s: list[float]  # from the send to the engine's queue (SPEC section 12's front end)
    sent: list[float]  # when each was sent: the first turns' times; NaN for a later one until it is
    until_s: float  # nothing is sent from then on


class SessionTurns:
    """Mixed into an :class:`ArrivalQueue`: the later turns of conversations, each sent when the turn before it
    ends (sim/inputs/sessions.py).

    The first turns are the sorted arrivals as ever; the rows after them are later turns, whose times nobody
    knows before the run. When a turn ends (answered, shed, failed, refused) the engine calls :meth:`turn_over`;
    the next turn of its session joins a heap at ``end + think + its front end's delay`` and passes the zones
    when its time comes, in time order with the open arrivals. A turn that would be sent after ``until_s`` (the
    run's horizon) is not sent, as a load test stops sending at its end.
    """

    _times: list[float]
    _tiers: list[int]
    times: np.ndarray
    n: int
    next_arrival: int
    next_time: float
    queued: int
    shed: list[int]
    thresholds: tuple[int, int, int]
    _enqueue: Callable[[int, int], None]

    def start_sessions(self, plan: SessionPlan) -> None:
        self.follows_me, self.think_s, self.delay_s, self.sent, self.until_s = plan
        self.n = int(np.count_nonzero(np.isfinite(self.times)))  # the first turns; the rest come by turn_over
        self.deferred: list[tuple[float, int]] = []  # (joins the queue at, turn)
        self.joined: list[float] = []  # sorted: when each later turn joined, for the fleet's rate estimate
        self.next_time = self._times[0] if self.n else math.inf

    def turn_over(self, i: int, at: float) -> None:
        """Turn ``i`` ended at ``at`` (its client saw the end then): its session's next turn is on its way."""
        j = self.follows_me[i]
        if j < 0:
            return
        sent = at + self.think_s[j]
        if sent >= self.until_s:
            return
        self.sent[j] = sent
        ready = sent + self.delay_s[j]
        heapq.heappush(self.deferred, (ready, j))
        bisect.insort(self.joined, ready)
        self.next_time = min(self.next_time, ready)

    def admit_until(self, now: float) -> None:
        """Open arrivals and released turns up to ``now``, in time order, through the zones."""
        times, i, n, limit = self._times, self.next_arrival, self.n, now + EPS
        deferred, tiers = self.deferred, self._tiers
        while True:
            if i < n and times[i] <= limit and not (deferred and deferred[0][0] < times[i]):
                j, at = i, times[i]
                i += 1
            elif deferred and deferred[0][0] <= limit:
                at, j = heapq.heappop(deferred)
            else:
                break
            tier = tiers[j]
            if self.queued < self.thresholds[0] or zone_admits(tier, self.queued, self.thresholds):
                self._enqueue(j, tier)
            else:
                self.shed.append(j)
                self.turn_over(j, at)  # its client had its 429 and carries on
        self.next_arrival = i
        self.next_time = min(times[i] if i < n else math.inf, deferred[0][0] if deferred else math.inf)

    def arrivals_between(self, start: float, end: float) -> int:
        lo, hi = self.times[: self.n].searchsorted([start, end])
        return int(hi - lo) + bisect.bisect_left(self.joined, end) - bisect.bisect_left(self.joined, start)

    @property
    def exhausted(self) -> bool:
        return self.next_arrival >= self.n and not self.deferred


class _SessionQueue(SessionTurns, ArrivalQueue):
    pass


class _RoutedSessionQueue(SessionTurns, RoutedArrivalQueue):
    pass


def session_queue(
    times: np.ndarray, tiers: np.ndarray, gpus: int, route: Callable[[int], int] | None, plan: SessionPlan
) -> ArrivalQueue:
    """The waiting room for a run with sessions: routed when ``route`` is given."""
    queue = _SessionQueue(times, tiers) if route is None else _RoutedSessionQueue(times, tiers, gpus, route)
    queue.start_sessions(plan)
    return queue
