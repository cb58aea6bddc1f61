"""What the gateway sent where: an approximate per-replica prefix index for ``prefix_affinity`` routing.

An engine replica behind the pool (vLLM, SGLang) does not say which blocks it holds. As
llm-d's approximate prefix-cache scorer does, the pool remembers the block keys of the
prompts it sent to each replica, least recently sent evicted beyond the replica's KV
size, and takes a prompt's leading keys found there as what that replica still caches.
A backend that knows its cache exactly (the ``sim`` engine) answers instead
(``Backend.cached_blocks``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["SentPrefixes"]

DEFAULT_BLOCKS = 1 << 20  # per replica, when the model sets no KV size: 16 M tokens of 16-token blocks


class SentPrefixes:
    """Per replica, the block keys last sent to it (see the module docstring)."""

    def __init__(self, capacity_blocks: float | None) -> None:
        self.capacity = int(capacity_blocks) if capacity_blocks and capacity_blocks < DEFAULT_BLOCKS else DEFAULT_BLOCKS
        self.sent: dict[int, OrderedDict[Hashable, None]] = {}

    def hits(self, gpu: int, keys: list[Hashable]) -> int:
        """Leading blocks of ``keys`` last sent to ``gpu`` and not since pushed out."""
        held = self.sent.get(gpu)
        if not held:
            return 0
        return next((m for m, key in enumerate(keys) if key not in held), len(keys))

    def record(self, gpu: int, keys: list[Hashable]) -> None:
        held = self.sent.setdefault(gpu, OrderedDict())
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget(self, gpu: int) -> None:
        self.sent.pop(gpu, None)
