"""One request record, produced by the simulator, the Locust harness and the open-loop sender.

A run's requests are a struct of numpy columns, one row per request, times in seconds
from the start of the schedule. The simulator fills ``scheduled`` with arrivals and
``finished`` with completions; a load test fills ``scheduled`` with the plan's send
times, ``sent`` with the actual ones and ``status`` with what the server answered.
Both end with an :class:`Outcome` per row, so "which requests count" and every latency
is computed the same way for a prediction and a measurement.

Columns a producer does not know stay ``None`` (the simulator sends on schedule, so it
keeps no ``sent`` column): at 10,000 requests/s an hour of requests is 36 million rows,
and each float column costs 288 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np

__all__ = ["Outcome", "RequestRecords"]


class Outcome(IntEnum):
    """What became of one request."""

    PENDING = 0  # never answered: not sent, or the run ended before its answer
    OK = 1
    REJECTED = 2  # shed by the admission zones (429)
    FAILED = 3  # its batch failed: a GPU died, the backend broke (5xx)
    TIMED_OUT = 4  # 504: past its deadline
    WRONG_OUTPUT = 5  # a 200 whose output was not this request's
    TRANSPORT_ERROR = 6  # the connection broke or the client gave up
    CLIENT_ERROR = 7  # another 4xx: the request itself was refused
    BAD_RESPONSE = 8  # a 200 that was not the API's answer: HTML, a non-SSE stream, an error mid-stream

    @classmethod
    def of_answer(cls, status: int, *, right_output: bool = True) -> Outcome:
        """What a load generator saw: an HTTP status (0: no answer arrived) and whether a 200 was this request's."""
        if status == 200:
            return cls.OK if right_output else cls.WRONG_OUTPUT
        if status == 0:
            return cls.TRANSPORT_ERROR
        if status == 429:
            return cls.REJECTED
        if status == 504:
            return cls.TIMED_OUT
        return cls.FAILED if status >= 500 else cls.CLIENT_ERROR


@dataclass
class RequestRecords:
    """Per-request columns of one run (see the module docstring)."""

    tier: np.ndarray  # int8 Tier values
    scheduled: np.ndarray  # float64: arrival (simulator) or scheduled send (load test)
    finished: np.ndarray  # float64: answer complete; nan when never answered
    outcome: np.ndarray  # int8 Outcome
    sent: np.ndarray | None = None  # float64 actual send; None: on schedule
    status: np.ndarray | None = None  # int32 HTTP status; 0: none arrived
    first_token: np.ndarray | None = None  # float64; None when tokens are not modelled or streamed
    prompt_tokens: np.ndarray | None = None  # int32
    output_tokens: np.ndarray | None = None  # int32
    # int64 prompt tokens found in the prefix cache; None: caching off (simulator); -1: not reported (load test)
    cached_tokens: np.ndarray | None = None
    preemptions: np.ndarray | None = None  # int64 times each was preempted (paged KV, simulator); None: not known

    def __len__(self) -> int:
        return int(self.scheduled.size)

    @classmethod
    def unanswered(
        cls, scheduled: np.ndarray, tier: np.ndarray, *, with_status: bool = True, with_tokens: bool = False
    ) -> RequestRecords:
        """Records for a schedule before anything was sent (a load generator fills them in)."""
        n = scheduled.size
        return cls(
            tier=tier.copy(),
            scheduled=scheduled.copy(),
            finished=np.full(n, np.nan),
            outcome=np.zeros(n, dtype=np.int8),
            sent=np.full(n, np.nan),
            status=np.zeros(n, dtype=np.int32) if with_status else None,
            first_token=np.full(n, np.nan) if with_tokens else None,
            prompt_tokens=np.zeros(n, dtype=np.int32) if with_tokens else None,
            output_tokens=np.zeros(n, dtype=np.int32) if with_tokens else None,
            cached_tokens=np.full(n, -1, dtype=np.int64) if with_tokens else None,  # -1: the answer said nothing
        )

    @property
    def ok(self) -> np.ndarray:
        return self.outcome == Outcome.OK

    @property
    def latency_ms(self) -> np.ndarray:
        """End to end from the scheduled time, so a lagging sender or a queue cannot hide delay."""
        return (self.finished - self.scheduled) * 1000.0

    @property
    def send_lag_ms(self) -> np.ndarray:
        """How late each request left (0 for a simulator: it sends on schedule)."""
        return np.zeros_like(self.scheduled) if self.sent is None else (self.sent - self.scheduled) * 1000.0

    def take(self, rows: np.ndarray | slice) -> RequestRecords:
        """The records of some rows (a window, a worker's share), every column alike."""
        columns = {f.name: getattr(self, f.name) for f in fields(self)}
        return RequestRecords(**{name: None if col is None else col[rows] for name, col in columns.items()})
