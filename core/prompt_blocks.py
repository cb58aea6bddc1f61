"""What a request's prompt shares with others, and its chain of block keys (SPEC section 13).

A workload says what a prompt starts with: one of a few system prompts
(``--shared-prefix``), or a published trace's block hash ids (Mooncake, Bailian). The
engine's cache needs one key per full block of *its* block size; :func:`prompt_keys`
makes them, so the simulator, its reference and the server's ``sim`` backend key a
prompt the same way. Blocks no other request can share get keys of their own request
(they still take cache space, and their place in the LRU order, after it finishes).
A conversation's turn (:class:`SessionHistory`) keys the rest by its session instead: turn
*t*'s prompt is turn *t-1*'s prompt and answer plus a new message, so its blocks are the
same blocks, and the answer's full blocks are kept for the next turn (:func:`answer_segment`; every
request's answer blocks are kept, as vLLM keeps them).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = [
    "PromptPrefix",
    "SessionHistory",
    "SharedPrefix",
    "TraceHashes",
    "answer_segment",
    "content_keys",
    "prefix_from_wire",
    "prefix_to_wire",
    "prompt_content_keys",
    "prompt_keys",
    "with_answer",
]


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """The prompt starts with system prompt ``group``, ``tokens`` long; the rest is the request's own."""

    group: int
    tokens: int


@dataclass(frozen=True, slots=True)
class TraceHashes:
    """A trace's hash ids, one per ``block_tokens`` of the prompt; equal ids are equal prefixes."""

    ids: tuple[int, ...]
    block_tokens: int


@dataclass(frozen=True, slots=True)
class SessionHistory:
    """A turn of conversation ``session``: its prompt is the session's history (after ``system``, a shared system
    prompt, when there is one), which every later turn of the session starts with too."""

    session: int
    system: SharedPrefix | None = None


PromptPrefix = SharedPrefix | TraceHashes | SessionHistory | None


def prefix_to_wire(prefix: PromptPrefix) -> list | None:
    """As JSON carries it (a load test's plan travels to its worker processes so)."""
    if isinstance(prefix, SharedPrefix):
        return ["shared", prefix.group, prefix.tokens]
    if isinstance(prefix, TraceHashes):
        return ["trace", list(prefix.ids), prefix.block_tokens]
    if isinstance(prefix, SessionHistory):
        system = prefix.system
        return ["session", prefix.session, [system.group, system.tokens] if system is not None else None]
    return None


def prefix_from_wire(wire: list | None) -> PromptPrefix:
    if wire is None:
        return None
    kind, first, size = wire
    if kind == "session":
        return SessionHistory(first, SharedPrefix(*size) if size is not None else None)
    return SharedPrefix(first, size) if kind == "shared" else TraceHashes(tuple(first), size)


def _own_key(prefix: PromptPrefix, uid: int) -> Hashable:
    """What a prompt's blocks after any shared ones are keyed by: its session's history, or the request alone."""
    return ("c", prefix.session) if isinstance(prefix, SessionHistory) else uid


def _system(prefix: PromptPrefix) -> PromptPrefix:
    return prefix.system if isinstance(prefix, SessionHistory) else prefix


def prompt_keys(prefix: PromptPrefix, uid: int, prompt: int, block_tokens: int) -> list[Hashable]:
    """One key per full block of a ``prompt``-token prompt; ``uid`` tells requests' own blocks apart."""
    full = prompt // block_tokens
    own = _own_key(prefix, uid)
    prefix = _system(prefix)
    if prefix is None:
        return [(own, m) for m in range(full)]
    if isinstance(prefix, SharedPrefix):
        shared = min(prefix.tokens, prompt) // block_tokens
        return [("s", prefix.group, m) for m in range(shared)] + [(own, m) for m in range(shared, full)]
    keys: list[Hashable] = []
    ids, size = prefix.ids, prefix.block_tokens
    for m in range(full):
        first, last = m * block_tokens // size, ((m + 1) * block_tokens - 1) // size
        if last >= len(ids):  # the trace gave fewer ids than the prompt has blocks: the rest is its own
            keys.extend((uid, k) for k in range(m, full))
            break
        held = ids[first] if first == last else ids[first : last + 1]
        keys.append(("t", held, m * block_tokens % size))
    return keys


def prompt_segments(prefix: PromptPrefix, uid: int, prompt: int, block_tokens: int) -> list[tuple[Hashable, int]]:
    """The full blocks of :func:`prompt_keys` as segments (key, blocks): a system prompt, each of a trace's hash
    ids, the request's own rest. Block m of a segment is the block :func:`prompt_keys` names; the engine's cache
    (:class:`~infer_plan.core.prefix_cache.PrefixCache`) does a few operations a segment instead of a block."""
    full = prompt // block_tokens
    segments: list[tuple[Hashable, int]] = []
    done = 0
    own = _own_key(prefix, uid)
    prefix = _system(prefix)
    if isinstance(prefix, SharedPrefix):
        done = min(prefix.tokens, prompt) // block_tokens
        if done:
            segments.append((("s", prefix.group), done))
    elif isinstance(prefix, TraceHashes):
        size = prefix.block_tokens
        if size % block_tokens:  # engine blocks that straddle trace blocks: one segment each, as prompt_keys keys them
            keys = prompt_keys(prefix, uid, prompt, block_tokens)
            return [(key, 1) for key in keys]
        per_id = size // block_tokens
        for h in prefix.ids:
            if done >= full:
                break
            n = min(per_id, full - done)
            segments.append((("t", h), n))
            done += n
    if full > done:
        segments.append(((own, done), full - done))
    return segments


def answer_segment(
    prefix: PromptPrefix, uid: int, prompt: int, output: int, block_tokens: int
) -> tuple[Hashable, int] | None:
    """The full blocks a finished request's answer filled, as the segment its release keeps cached (None: none).

    vLLM and SGLang keep every full block a sequence filled, its answer's too, and cannot tell
    a conversation's turn from any other request; so every answer's full blocks are kept,
    taking cache space that older prompts would otherwise keep. A conversation's turn grows
    its history segment (the last segment of :func:`prompt_segments`, counted to the end of
    the answer), so its next turn, which starts with this prompt and answer, finds them
    cached; another request's answer blocks are its own, never found again."""
    if isinstance(prefix, SessionHistory):
        system = prefix.system
        done = min(system.tokens, prompt) // block_tokens if system is not None else 0
        return (("c", prefix.session), done), (prompt + output) // block_tokens - done
    extra = (prompt + output) // block_tokens - prompt // block_tokens
    return (("a", uid), extra) if extra else None


def with_answer(segments: Sequence[tuple[Hashable, int]], answer: tuple[Hashable, int] | None) -> list:
    """``segments`` followed by an answer's blocks (:func:`answer_segment`): a conversation's grows its last
    segment, another request's is a segment of its own. What a preempted sequence's recomputed context is keyed
    by, and what a finished one leaves cached."""
    kept = list(segments)
    if answer is None:
        return kept
    key, grown = answer
    had = kept[-1][1] if kept and kept[-1][0] == key else 0
    if grown > had:
        kept[len(kept) - (1 if had else 0) :] = [(key, grown)]
    return kept


def content_keys(tokens: Sequence[Hashable], block_tokens: int) -> list[Hashable]:
    """Keys of a real prompt's full blocks by content, as vLLM hashes them: each block's key covers the block and
    every token before it (a chain), so equal keys are equal prefixes. The server's ``sim`` engine keys the words
    (or token ids) it is sent this way."""
    keys: list[Hashable] = []
    key: Hashable = None
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        key = hash((key, tuple(tokens[start : start + block_tokens])))
        keys.append(key)
    return keys


def prompt_content_keys(prompt: str | list[int], block_tokens: int) -> list[Hashable]:
    """:func:`content_keys` of a prompt as the server's ``sim`` engine counts its tokens: words, or token ids."""
    return content_keys(prompt if isinstance(prompt, list) else prompt.split(), block_tokens)
