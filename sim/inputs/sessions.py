"""Conversations (``--sessions TURNS --think-time DIST``): the workload whose prompts repeat most (SPEC section 13).

A session is a chat: its first turn is sent open-loop (sessions start at ``--rps``), each
later one a think time after the answer to the one before ended, closed-loop. Turn *t*'s
prompt is the whole history, the shared system prompt when there is one, every earlier
message and answer, plus a new message of ``--prompt-tokens``; its answer is
``--output-tokens``. So with prefix caching a turn prefills little more than its new
message, which is why teams move chat to engines that cache (vLLM, SGLang).

Every length is drawn before the run; only when a later turn is sent is left to the
simulation (:class:`~infer_plan.sim.inputs.arrivals.Arrivals` ``follows`` and ``think_s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from ...core.errors import UsageError
from ...core.prompt_blocks import SessionHistory
from .arrivals import Arrivals
from .lengths import LengthDist
from .shared_prefix import SharedPrefixSpec

__all__ = ["SessionRows", "SessionSpec", "parse_think_time"]


def parse_think_time(text: str) -> LengthDist:
    """``--think-time``: seconds, a number (0 included) or a distribution as ``--prompt-tokens`` takes them."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None and math.isfinite(seconds):
        if seconds < 0:
            raise UsageError(f"--think-time: seconds must be >= 0, got {text!r}", field="think_time")
        return LengthDist(kind="fixed", value=seconds)
    try:
        return LengthDist.parse(text)
    except UsageError as err:
        raise UsageError(f"--think-time: {err}", field="think_time") from None


class SessionSpec(BaseModel):
    """Turns per session and the think time before each later turn (seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    turns: LengthDist
    think_s: LengthDist = LengthDist(kind="fixed", value=0.0)

    @property
    def mean_turns(self) -> float:
        return max(1.0, self.turns.mean_tokens)

    def build(
        self,
        starts: Arrivals,
        message: LengthDist,
        answer: LengthDist,
        system: SharedPrefixSpec | None,
        rng: np.random.Generator,
        prefix_rng: np.random.Generator,
    ) -> Arrivals:
        """Every turn of sessions starting at ``starts`` (times and tiers): the first turns in time order, then
        the later ones session by session, each with its prompt (history plus message) and answer lengths."""
        sessions = len(starts)
        turns = self.turns.sample(sessions, rng).astype(np.int64)
        total = int(turns.sum())
        session_of = np.repeat(np.arange(sessions), turns)  # session-major: a session's turns together
        first_of = np.concatenate(([0], np.cumsum(turns)[:-1]))  # its first turn's place in that order
        turn = np.arange(total) - first_of[session_of]
        sent = message.sample(total, rng).astype(np.int64)
        got = answer.sample(total, rng).astype(np.int64)
        history = np.cumsum(sent + got)
        history -= (history - sent - got)[first_of][session_of]  # each session's own running sum
        prompt = history - got  # every earlier message and answer, and this turn's message
        think = np.where(turn > 0, self.think_s.draw(total, rng), 0.0)
        systems = system.draw(sessions, prefix_rng) if system is not None else None
        if system is not None:
            prompt += system.tokens
        # Rows: the first turns (in the starts' order, which is time order), then the rest session-major.
        later = np.flatnonzero(turn > 0)
        row_of = np.empty(total, dtype=np.int64)
        row_of[first_of] = np.arange(sessions)
        row_of[later] = sessions + np.arange(later.size)
        order = np.concatenate((first_of, later))
        follows = np.full(total, -1, dtype=np.int64)
        follows[row_of[later]] = row_of[later - 1]
        times = np.full(total, np.nan)
        times[:sessions] = starts.times
        prefixes = np.empty(total, dtype=object)
        prefixes[:] = [SessionHistory(int(s), systems[s] if systems is not None else None)
                       for s in session_of[order].tolist()]  # fmt: skip
        return Arrivals(times, starts.tiers[session_of[order]], prompt[order].astype(np.int32),
                        got[order].astype(np.int32), prefixes, follows, think[order])  # fmt: skip


@dataclass(frozen=True)
class SessionRows:
    """Where each row of a workload with sessions stands in its conversation: what a load generator needs to send
    the turns closed-loop and what a result groups by."""

    first: np.ndarray  # the row of its session's first turn
    turn: np.ndarray  # 1 for a session's first turn, 2 for the next, ...
    next: np.ndarray  # the row of the turn sent after it (-1: the session's last)

    @classmethod
    def of(cls, follows: np.ndarray) -> SessionRows:
        n = follows.size
        first, turn, nxt = np.arange(n), np.ones(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        for row in np.flatnonzero(follows >= 0).tolist():  # a turn's row comes after the one it follows
            before = int(follows[row])
            first[row], turn[row], nxt[before] = first[before], turn[before] + 1, row
        return cls(first, turn, nxt)
