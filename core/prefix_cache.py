"""One GPU's KV cache counted in blocks, with prefix caching (SPEC section 13): the rule the engine and the
server's ``sim`` backend share.

Why blocks and keys: vLLM and SGLang keep KV in fixed-size blocks and identify a full
prompt block by its content (a hash over the prefix up to it). A request whose leading
blocks are already resident skips their prefill, which is most of a chat turn's or an
agent's prompt. A request's prompt is a list of *segments* (:mod:`infer_plan.core.prompt_blocks`):
runs of blocks that belong together (a system prompt, a trace's hash id, the request's
own text), block *m* of segment *K* being one block everywhere it appears.

The rule, reserve policy (KV for prompt and output taken whole at admission, as section 10):

- A request needs ``ceil((prompt + output) / block)`` blocks. Its leading blocks already
  resident (in use by another sequence, or cached) are *hits*: they are shared, not taken
  again. It fits when the blocks in use plus its new ones fit the cache; cached blocks
  nobody uses are free space, evicted least recently used when the space is needed.
- Its own prompt blocks become resident when its prefill ends (vLLM hashes a block once
  computed): a request admitted while another still prefills the same prefix does not hit it.
- When it finishes, its full blocks nobody else uses become cached, its answer's and then
  its prompt's, the last block first, so a prefix's first blocks are evicted last (vLLM
  frees a sequence's blocks in reverse for this reason); its partial last block is freed.

Hit tokens are ``min(hits x block, prompt - 1)``: the first token still needs a step that
prefills at least one token, so a prompt cached whole recomputes its last one.

How it is kept, so a request costs a few operations per segment, not per block: with
that release order the resident blocks of a segment are always a prefix of it, the ones
in use a shorter prefix (every holder holds a prefix: its hits, or the whole segment
once prefilled), and the cached rest sits in the LRU as *runs* released together, each
evicted from its last block down. The reference (``sim/references/step_reference.py``)
keeps the same rule block by block, and the tests hold the two to each other.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .prompt_blocks import with_answer

__all__ = ["PrefixCache", "Segment", "blocks_needed", "cached_tokens"]

Segment = tuple[Hashable, int]  # (key, blocks): blocks 0 .. n-1 of segment key


def blocks_needed(prompt: int, output: int, block_tokens: int) -> int:
    """Blocks a sequence holds at its longest: its prompt and its whole answer."""
    return -(-(prompt + output) // block_tokens)


def cached_tokens(hits: int, prompt: int, block_tokens: int) -> int:
    """Prompt tokens a request skips for ``hits`` leading blocks found resident."""
    return min(hits * block_tokens, prompt - 1)


@dataclass(slots=True)
class _Resident:
    """One segment's blocks on the GPU: ``present`` leading ones, the first ``in_use`` of them held."""

    present: int = 0
    in_use: int = 0
    holders: dict[int, int] = field(default_factory=dict)  # held prefix length -> sequences holding it
    runs: list[list] = field(default_factory=list)  # its cached runs [key, lo, hi, id], oldest (highest) first


class PrefixCache:
    """One GPU's blocks (see the module docstring)."""

    def __init__(self, capacity_blocks: float) -> None:
        self.capacity = capacity_blocks  # math.inf: no KV limit, nothing is ever evicted
        self.segments: dict[Hashable, _Resident] = {}
        self.lru: OrderedDict[int, list] = OrderedDict()  # run id -> [key, lo, hi, id], oldest first
        self.next_run = 0
        self.used = 0  # resident blocks some sequence holds
        self.cached = 0  # resident blocks nobody holds: free space, evicted least recently used
        self.unkeyed = 0  # blocks in use no other request can share (partial blocks, outputs, prefilling)

    def hits(self, segments: Sequence[Segment]) -> list[int]:
        """Per segment, the leading blocks resident that a request starting with ``segments`` can share."""
        holds = []
        for key, n in segments:
            got = self.segments.get(key)
            present = min(got.present, n) if got is not None else 0
            holds.append(present)
            if present < n:
                break
        return holds

    def fits(self, holds: list[int], segments: Sequence[Segment], blocks: int) -> bool:
        """Whether a request of ``blocks`` blocks sharing ``holds`` fits beside the blocks in use."""
        revived = sum(max(0, h - self._in_use(key)) for (key, _), h in zip(segments, holds, strict=False))
        return self.used + self.unkeyed + revived + blocks - sum(holds) <= self.capacity

    def admit(self, holds: list[int], segments: Sequence[Segment], blocks: int) -> None:
        """Take the request's blocks (call :meth:`fits` first): its hits are shared, the rest new."""
        for (key, _), h in zip(segments, holds, strict=False):
            if h:
                self._hold(key, 0, h)
        self.unkeyed += blocks - sum(holds)
        self._evict()

    def prefilled(self, holds: list[int], segments: Sequence[Segment]) -> None:
        """The request's prompt blocks after its hits are computed: each becomes resident and shared (a block
        another request computed meanwhile is shared instead, and this request's copy freed)."""
        for i, (key, n) in enumerate(segments):
            self._hold(key, holds[i] if i < len(holds) else 0, n)
        self.unkeyed -= sum(n for _, n in segments) - sum(holds)

    def keep_answer(self, segments: list[Segment], answer: Sequence[Segment]) -> list[Segment]:
        """A finished request's answer: its full blocks, until now its own, become keyed blocks that its release
        caches (``answer``: one segment from :func:`~infer_plan.core.prompt_blocks.answer_segment`, growing a
        conversation's history segment or of its own, or the server's blocks one segment each). Returns the
        segments to :meth:`release` it with."""
        kept = list(segments)
        for grows in answer:
            key, grown = grows
            had = kept[-1][1] if kept and kept[-1][0] == key else 0
            if grown > had:
                self._hold(key, had, grown)
                self.unkeyed -= grown - had
                kept = with_answer(kept, grows)
        return kept

    def free(self) -> float:
        """Blocks a sequence could take now: those nobody holds (cached ones are evicted for it)."""
        return self.capacity - self.used - self.unkeyed

    def take(self, blocks: int = 1) -> None:
        """Paged KV: a decoding sequence takes ``blocks`` more of its own as its answer grows (see :meth:`free`)."""
        self.unkeyed += blocks
        self._evict()

    def release(self, segments: Sequence[Segment], blocks: int, holds: list[int] | None = None) -> None:
        """A sequence leaves: the blocks nobody else holds are cached, its last segment first, the rest freed.
        ``holds``: it leaves before its prefill ended (the server's abandoned request), holding only its hits."""
        held = [n for _, n in segments] if holds is None else holds
        for i in range(len(held) - 1, -1, -1):
            if held[i]:
                self._let_go(segments[i][0], held[i])
        self.unkeyed -= blocks - sum(held)

    # -- one segment --------------------------------------------------------------------------------------------

    def _in_use(self, key: Hashable) -> int:
        got = self.segments.get(key)
        return got.in_use if got is not None else 0

    def _hold(self, key: Hashable, before: int, now: int) -> None:
        """A sequence that held the first ``before`` blocks of ``key`` now holds the first ``now``."""
        seg = self.segments.get(key)
        if seg is None:
            seg = self.segments[key] = _Resident()
        if before:
            _drop(seg.holders, before)
        seg.holders[now] = seg.holders.get(now, 0) + 1
        if now <= seg.in_use:
            return
        revive = min(now, seg.present) - seg.in_use  # cached blocks held again: the newest runs, from their bottom
        while revive > 0:
            run = seg.runs[-1]
            take = min(revive, run[2] - run[1])
            run[1] += take
            revive -= take
            self.cached -= take
            if run[1] == run[2]:
                seg.runs.pop()
                del self.lru[run[3]]
        self.used += now - seg.in_use
        seg.in_use = now
        seg.present = max(seg.present, now)

    def _let_go(self, key: Hashable, held: int) -> None:
        seg = self.segments[key]
        _drop(seg.holders, held)
        still = max(seg.holders, default=0)
        if still < seg.in_use:  # blocks nobody holds now: one run, the newest in the LRU
            run = [key, still, seg.in_use, self.next_run]
            self.next_run += 1
            seg.runs.append(run)
            self.lru[run[3]] = run
            self.used -= seg.in_use - still
            self.cached += seg.in_use - still
            seg.in_use = still

    def _evict(self) -> None:
        over = self.used + self.unkeyed + self.cached - self.capacity
        while over > 0 and self.lru:
            run = next(iter(self.lru.values()))  # the oldest run, from its last block down
            seg = self.segments[run[0]]
            take = min(over, run[2] - run[1])
            run[2] -= take
            seg.present = run[2]
            self.cached -= take
            over -= take
            if run[1] == run[2]:
                del self.lru[run[3]]
                seg.runs.pop(0)
                if not seg.present and not seg.holders:
                    del self.segments[run[0]]


def _drop(holders: dict[int, int], held: int) -> None:
    """One holder of a ``held``-block prefix fewer (a plain dict: a Counter costs microseconds a segment)."""
    left = holders[held] - 1
    if left:
        holders[held] = left
    else:
        del holders[held]
