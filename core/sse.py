"""The one reader of OpenAI's streamed answers (Server-Sent Events), for the load tests and the ``openai`` backend.

Only the ``data:`` lines matter, and each needs its own arrival time, so the reader is
fed one line at a time (:meth:`StreamReader.feed`) by whoever holds the socket: the load
test's blocking reader under gevent (:func:`read_stream`), the backend's ``async for``
over aiohttp. Both then count the same chunks as tokens, by the rule ``vllm bench serve``
uses (:func:`token_piece`), so a TTFT or an ITL means the same thing on both sides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = ["CountedBy", "Reading", "StreamReader", "read_stream", "take_usage", "token_piece"]

_SSE_FIELDS = (b"event:", b"id:", b"retry:", b":")


class CountedBy(IntEnum):
    """Where a request's token counts came from (the report says which)."""

    NONE = 0  # no answer, or an answer that named no count
    USAGE = 1  # the answer's own usage object
    CHUNKS = 2  # content chunks of the stream, counted (a server without include_usage)


@dataclass
class Reading:
    """What one answer held: its tokens' arrival times, its text, its counts, or what was wrong with it."""

    token_times: list[float] = field(default_factory=list)  # clock time of each token's chunk
    text: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    finish_reason: str | None = None
    problem: str | None = None  # not the API's answer: the reason, one line
    done: bool = False  # ``data: [DONE]`` seen

    @property
    def counted_by(self) -> CountedBy:
        if self.completion_tokens is not None:
            return CountedBy.USAGE
        return CountedBy.CHUNKS if self.token_times else CountedBy.NONE

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)


class StreamReader:
    """Fed an SSE stream line by line; holds the :class:`Reading` so far."""

    def __init__(self) -> None:
        self.reading = Reading()

    @property
    def finished(self) -> bool:
        """Nothing more to read: ``[DONE]`` came, or the stream is not what it should be."""
        return self.reading.done or self.reading.problem is not None

    def feed(self, line: bytes, at: float) -> list[str]:
        """One line, arrived at ``at``: the token pieces it carried (each timed ``at``)."""
        reading = self.reading
        line = line.strip()
        if self.finished or not line or line.startswith(_SSE_FIELDS):
            return []
        if not line.startswith(b"data:"):
            reading.problem = f"not an SSE stream: {line[:60].decode('utf-8', 'replace')!r}"
            return []
        data = line[5:].strip()
        if data == b"[DONE]":
            reading.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            reading.problem = f"an SSE event that is not JSON: {data[:60].decode('utf-8', 'replace')!r}"
            return []
        return self._take(chunk, at)

    def end(self) -> Reading:
        """The stream closed: its reading, with a problem if ``[DONE]`` never came."""
        if not self.finished:
            self.reading.problem = "the stream ended without data: [DONE]"
        return self.reading

    def _take(self, chunk: Any, at: float) -> list[str]:
        reading = self.reading
        if not isinstance(chunk, dict):
            reading.problem = "an SSE event that is not a JSON object"
            return []
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            reading.problem = f"error mid-stream: {error.get('message', error)}"
            return []
        take_usage(chunk.get("usage"), reading)
        pieces = []
        for choice in chunk.get("choices") or ():
            piece = token_piece(choice)
            if piece is not None:
                pieces.append(piece)
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                reading.finish_reason = choice["finish_reason"]
        reading.token_times += [at] * len(pieces)
        reading.text += pieces
        return pieces


def read_stream(readline: Callable[[], bytes], clock: Callable[[], float] = time.perf_counter) -> Reading:
    """Read a stream to ``data: [DONE]`` (or its end) from a blocking ``readline``, timing every token's chunk."""
    reader = StreamReader()
    while not reader.finished:
        line = readline()
        if not line:
            break
        reader.feed(line, clock())
    return reader.end()


def token_piece(choice: Any) -> str | None:
    """The text of the token this choice carries, or None when it carries none.

    A chunk with empty text is still a token: an engine streams one chunk per token and
    a token whose text is held back (half a UTF-8 character, a special token) arrives as
    "" (27 of 320 chunks in a probe of the tiny model on vLLM). Skipping those would move TTFT to
    the next chunk and merge two gaps into one ITL; ``vllm bench serve`` counts them too. Two
    empty chunks are not tokens: the end marker (empty, with a ``finish_reason``, as
    OpenAI and our server send when the end comes after the last token) and a chat
    stream's role announcement (empty content beside ``role``, which some servers send
    before any token is made).
    """
    if not isinstance(choice, dict):
        return None
    if "delta" in choice:
        delta = choice["delta"] if isinstance(choice["delta"], dict) else {}
        piece = delta.get("content")
        if piece is None:
            piece = delta.get("reasoning_content")
        announce = "role" in delta
    else:
        piece, announce = choice.get("text"), False
    if not isinstance(piece, str):
        return None
    if not piece and (announce or choice.get("finish_reason") is not None):
        return None
    return piece


def take_usage(usage: Any, reading: Reading) -> None:
    """An answer's ``usage`` object (streamed or not), where it names the counts."""
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        reading.completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            reading.prompt_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            reading.cached_tokens = details["cached_tokens"]
