"""What a load test sends: the arrival schedule (with token lengths), keys per tier, the API, and where.

The plan travels to Locust worker processes as bytes (a Locust message from the master,
so a worker on another machine needs nothing but the master's address); worker *k* of
*N* sends arrivals ``k, k+N, k+2N, ...``, and with sessions the later turns of the
sessions it starts (a conversation's turns are sent one after another by one process).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..core.prompt_blocks import prefix_from_wire, prefix_to_wire
from ..sim.inputs.arrivals import Arrivals
from ..sim.inputs.sessions import SessionRows
from .apis import Api

__all__ = ["LoadPlan"]


@dataclass(frozen=True)
class LoadPlan:
    url: str
    arrivals: Arrivals
    keys: dict[int, str]  # tier -> API key
    model: str
    timeout_s: float = 60.0
    api: Api = Api.INFERENCE
    stream: bool = False
    tokenizer: str | None = None  # the target's: prompts of exactly the planned token counts
    until_s: float = math.inf  # sessions: no later turn is sent after this time of the schedule (the run's end)

    def __post_init__(self) -> None:
        if self.api.has_tokens and not self.arrivals.has_tokens:
            raise ValueError("a token API needs each request's prompt and output lengths")

    def to_bytes(self) -> bytes:
        meta = json.dumps(
            {
                "url": self.url,
                "keys": {str(k): v for k, v in self.keys.items()},
                "model": self.model,
                "timeout_s": self.timeout_s,
                "api": self.api.value,
                "stream": self.stream,
                "tokenizer": self.tokenizer,
                "until_s": self.until_s,
                "prefixes": None
                if self.arrivals.prefixes is None
                else [prefix_to_wire(x) for x in self.arrivals.prefixes],
            }
        )
        columns = {"times": self.arrivals.times, "tiers": self.arrivals.tiers}
        if self.arrivals.has_tokens:
            columns |= {"prompt_tokens": self.arrivals.prompt_tokens, "output_tokens": self.arrivals.output_tokens}
        if self.arrivals.has_sessions:
            columns |= {"follows": self.arrivals.follows, "think_s": self.arrivals.think_s}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(meta), **columns)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LoadPlan:
        with np.load(io.BytesIO(data)) as arrays:
            meta = json.loads(str(arrays["meta"]))
            lengths = [arrays[k].copy() if k in arrays else None for k in ("prompt_tokens", "output_tokens")]
            prefixes = None
            if meta.get("prefixes") is not None:
                prefixes = np.empty(len(meta["prefixes"]), dtype=object)
                prefixes[:] = [prefix_from_wire(x) for x in meta["prefixes"]]
            sessions = [arrays[k].copy() if k in arrays else None for k in ("follows", "think_s")]
            arrivals = Arrivals(arrays["times"].copy(), arrays["tiers"].copy(), *lengths, prefixes, *sessions)
        return cls(
            url=meta["url"],
            arrivals=arrivals,
            keys={int(k): v for k, v in meta["keys"].items()},
            model=meta["model"],
            timeout_s=meta["timeout_s"],
            api=Api(meta["api"]),
            stream=meta["stream"],
            tokenizer=meta["tokenizer"],
            until_s=meta["until_s"],
        )

    @cached_property
    def sessions(self) -> SessionRows | None:
        """Each row's place in its conversation (None: no sessions)."""
        follows = self.arrivals.follows
        return SessionRows.of(follows) if follows is not None else None

    def share(self, index: int, count: int) -> np.ndarray:
        """Indices of the arrivals that worker ``index`` of ``count`` sends: every ``count``-th open-loop
        arrival (a session's first turn), with the later turns of its sessions."""
        if self.sessions is None:
            return np.arange(index, len(self.arrivals), count)
        return np.flatnonzero(self.sessions.first % count == index)

    def message_tokens(self, i: int) -> int:
        """Tokens of row ``i``'s own new message: its whole prompt for a request or a session's first turn, what
        its prompt adds to the turn before's prompt and answer for a later turn."""
        prompt = self.arrivals.prompt_tokens
        assert prompt is not None and self.arrivals.output_tokens is not None
        before = int(self.arrivals.follows[i]) if self.arrivals.follows is not None else -1
        if before < 0:
            return int(prompt[i])
        return max(1, int(prompt[i]) - int(prompt[before]) - int(self.arrivals.output_tokens[before]))
