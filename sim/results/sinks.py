"""Where an engine hands its settled requests: kept whole, folded into figures, or written to a file.

An engine gives every request away exactly once, in arrival order, when nothing can
change it any more, together with the batches (or step runs) and inter-token gaps
booked so far. What happens to them is the sink's business: :class:`RecordKeeper`
keeps everything (a load test compares request by request), :class:`~.tally.Tally`
folds them into histograms (capacity at a million requests a second), and
:class:`RequestWriter` streams them to a CSV file (``--save-requests``) beside either.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Protocol

import numpy as np

from ...core.errors import UsageError
from ...core.records import Outcome, RequestRecords
from ...core.tiers import Tier
from .token_gaps import TokenGaps

__all__ = ["RecordKeeper", "RequestWriter", "Sink", "Tee", "simulated_outcomes"]

_N_TIERS = len(Tier)


def simulated_outcomes(admitted: np.ndarray, failed: np.ndarray, finished: np.ndarray, *, final: bool) -> np.ndarray:
    """What became of simulated requests: shed, failed with their GPU, answered; at the run's end, an admitted
    request nobody answered (the whole fleet down) is PENDING. Both engines settle their requests by this."""
    outcome = np.where(admitted, np.int8(Outcome.OK), np.int8(Outcome.REJECTED))
    outcome[failed] = Outcome.FAILED
    if final:
        outcome[admitted & np.isnan(finished)] = Outcome.PENDING
    return outcome


class Sink(Protocol):
    def fold(self, records: RequestRecords) -> None:
        """Settled requests, in arrival order, each exactly once."""

    def fold_batches(self, start: np.ndarray, end: np.ndarray, size: np.ndarray) -> None:
        """Batches (continuous batching: step runs) booked since the last call."""

    def fold_gaps(self, gaps: TokenGaps) -> None:
        """Inter-token gaps booked since the last call."""

    def settled(self, folded_until_s: float) -> bool:
        """Whether the run may stop now (a precision target reached); every arrival before the time is folded."""


class RecordKeeper:
    """Keeps every request, batch and gap: the exact engine's output."""

    def __init__(self) -> None:
        self.parts: list[RequestRecords] = []
        self.batch_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.gap_parts: list[TokenGaps] = []

    def fold(self, records: RequestRecords) -> None:
        self.parts.append(records.take(slice(None)))

    def fold_batches(self, start: np.ndarray, end: np.ndarray, size: np.ndarray) -> None:
        self.batch_parts.append((start, end, size))

    def fold_gaps(self, gaps: TokenGaps) -> None:
        self.gap_parts.append(gaps)

    def settled(self, folded_until_s: float) -> bool:
        return False

    def records(self) -> RequestRecords:
        columns = {}
        for name in RequestRecords.__dataclass_fields__:
            values = [getattr(p, name) for p in self.parts]
            columns[name] = None if not values or values[0] is None else np.concatenate(values)
        if not self.parts:
            empty = np.empty(0)
            return RequestRecords(tier=np.empty(0, np.int8), scheduled=empty, finished=empty,
                                  outcome=np.empty(0, np.int8))  # fmt: skip
        return RequestRecords(**columns)

    def batches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.batch_parts:
            return np.empty(0), np.empty(0), np.empty(0, np.int64)
        start, end, size = zip(*self.batch_parts, strict=True)
        return np.concatenate(start), np.concatenate(end), np.concatenate(size).astype(np.int64)

    def gaps(self) -> TokenGaps:
        if not self.gap_parts:
            return TokenGaps(np.empty(0), np.empty((0, _N_TIERS), np.int64), np.empty(0))
        return TokenGaps(
            np.concatenate([g.gaps_ms for g in self.gap_parts]),
            np.concatenate([g.counts for g in self.gap_parts]),
            np.concatenate([g.at_s for g in self.gap_parts]),
        )


class RequestWriter:
    """Writes each settled request as a CSV row as it comes (``--save-requests``): memory stays flat.

    One header for the simulator and the load test, so their files line up column by
    column; what a producer does not know stays empty (the simulator sends on schedule
    and answers no HTTP status, so ``sent_s`` and ``status`` are empty there). The two
    load-test columns come last, then the prompt tokens found cached (prefix caching; empty
    where unknown), so a reader by position of the older files still works.
    """

    HEADER = "scheduled_s,finished_s,tier,outcome,first_token_s,prompt_tokens,output_tokens,sent_s,status,cached_tokens"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: IO[str] = path.open("w", encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror}", field="save-requests") from None
        self.file.write(self.HEADER + "\n")
        self.rows = 0

    def fold(self, records: RequestRecords) -> None:
        n = len(records)
        if n == 0:
            return

        def seconds(column: np.ndarray | None) -> np.ndarray:
            return np.full(n, "") if column is None else np.char.mod("%.6f", column)

        def counts(column: np.ndarray | None) -> np.ndarray:
            return np.full(n, "") if column is None else column.astype(str)

        tiers, outcomes = np.array([t.label for t in Tier]), np.array([o.name.lower() for o in Outcome])
        cached = counts(records.cached_tokens)
        if records.cached_tokens is not None:
            cached[records.cached_tokens < 0] = ""  # the answer did not say
        table = np.column_stack([
            seconds(records.scheduled), seconds(records.finished), tiers[records.tier], outcomes[records.outcome],
            seconds(records.first_token), counts(records.prompt_tokens), counts(records.output_tokens),
            seconds(records.sent), counts(records.status), cached,
        ])  # fmt: skip
        table[table == "nan"] = ""
        np.savetxt(self.file, table, fmt="%s", delimiter=",")
        self.rows += n

    def fold_batches(self, start: np.ndarray, end: np.ndarray, size: np.ndarray) -> None:
        pass

    def fold_gaps(self, gaps: TokenGaps) -> None:
        pass

    def settled(self, folded_until_s: float) -> bool:
        return False

    def close(self) -> None:
        self.file.close()


class Tee:
    """Several sinks at once; the first one decides when the run may stop."""

    def __init__(self, first: Sink, *others: Sink) -> None:
        self.sinks = (first, *others)

    def fold(self, records: RequestRecords) -> None:
        for sink in self.sinks:
            sink.fold(records)

    def fold_batches(self, start: np.ndarray, end: np.ndarray, size: np.ndarray) -> None:
        for sink in self.sinks:
            sink.fold_batches(start, end, size)

    def fold_gaps(self, gaps: TokenGaps) -> None:
        for sink in self.sinks:
            sink.fold_gaps(gaps)

    def settled(self, folded_until_s: float) -> bool:
        return self.sinks[0].settled(folded_until_s)
