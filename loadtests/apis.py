"""What a load test sends to each API, and how it reads each answer's tokens.

``/v1/inference`` is our own fixed-cycle API; ``completions`` and ``chat`` are the
OpenAI surface every LLM engine speaks (vLLM, SGLang, Ollama, a LiteLLM proxy). A
streamed answer is read line by line as it arrives, so each content chunk gets the time
it reached the client: the first is the request's first token, the gaps between
consecutive ones its inter-token latencies (as ``vllm bench serve`` counts them).

The stream reader itself is :mod:`infer_plan.core.sse`, shared with the ``openai``
backend, so both count the same chunks as tokens.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from ..core.prompt_blocks import PromptPrefix, SharedPrefix, TraceHashes
from ..core.sse import CountedBy, Reading, read_stream, take_usage
from ..core.tokens import load_tokenizer

__all__ = [
    "Api",
    "Conversation",
    "CountedBy",
    "Messages",
    "Reading",
    "chat_messages",
    "prompt_text",
    "read_answer",
    "read_stream",
    "request_body",
]


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


def prompt_text(index: int, tokens: int, tokenizer: str | None = None, prefix: PromptPrefix = None) -> str:
    """A prompt of ``tokens`` tokens that starts with the request's own number, or with its shared system prompt.

    Without a tokenizer: ``tokens`` words, exactly that many for the sim backend and
    about that many for a real vocabulary. With the target's tokenizer (a name or a
    folder, as ``vllm bench serve --tokenizer`` takes): cut to that many of its tokens,
    so a real engine prefills what was asked (give or take a merge at the cut; the
    answer's usage says what it counted). The unique first word keeps a prefix cache
    from answering one request's prompt with another's. A
    :class:`~infer_plan.core.prompt_blocks.SharedPrefix` puts its system prompt first,
    the same text for every request of its group (``--shared-prefix``), and a trace's
    :class:`~infer_plan.core.prompt_blocks.TraceHashes` one block of text per hash id:
    what a target's prefix cache can reuse.
    """
    if isinstance(prefix, TraceHashes):  # each hash id its own block of words: equal ids, equal text
        blocks = [(f"h{h}", h, prefix.block_tokens) for h in prefix.ids]
    elif isinstance(prefix, SharedPrefix):
        blocks = [(f"system{prefix.group}", prefix.group, min(prefix.tokens, tokens - 1))]
    else:
        blocks = []
    parts, left = [], tokens
    for first, offset, block in blocks:
        if left <= 1:
            break  # the request's own first word stays, so no two prompts are one
        size = min(block, left - 1)
        parts.append(
            _words(first, offset, size) if tokenizer is None else _cut(_words(first, offset, size), size, tokenizer)
        )
        left -= size
    own = _words(f"r{index}", index, max(1, left))
    parts.append(own if tokenizer is None else _cut(own, left, tokenizer))
    return " ".join(parts)


def _words(first: str, offset: int, count: int) -> str:
    return " ".join([first, *(_WORDS[(offset + j) % len(_WORDS)] for j in range(max(0, count - 1)))])


def _cut(text: str, tokens: int, tokenizer: str) -> str:
    encoder = load_tokenizer(tokenizer)
    ids = encoder(text, add_special_tokens=False)["input_ids"][: max(1, tokens)]
    return encoder.decode(ids)


Messages = list[dict[str, str]]


def chat_messages(prompt: str | Messages) -> Messages:
    """A chat request's messages: a conversation's history as it is, a lone prompt as one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


class Conversation:
    """A session's history as its client keeps it (SPEC section 13): the chat API's messages, the target's own
    answers included, or for completions one prompt grown by every message and answer. A turn that got no
    answer leaves no trace in it: the next turn asks again from what was answered."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.messages: Messages = []
        self.text = ""

    def asking(self, message: str) -> str | Messages:
        """What the turn sends: the history and its new ``message``."""
        if self.api is Api.CHAT:
            return [*self.messages, {"role": "user", "content": message}]
        return f"{self.text} {message}" if self.text else message

    def answered(self, message: str, answer: str) -> None:
        if self.api is Api.CHAT:
            self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        else:
            self.text = f"{self.asking(message)}{answer}"


def request_body(api: Api, model: str, prompt: str | Messages, output_tokens: int, *, stream: bool) -> dict[str, Any]:
    """The JSON body: exactly ``output_tokens`` asked for (``ignore_eos``, as ``vllm bench serve`` does); a chat
    prompt may be a conversation's messages."""
    if api is Api.INFERENCE:
        return {"model": model, "input": prompt}
    body: dict[str, Any] = {"model": model, "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0}
    if api is Api.CHAT:
        body["messages"] = chat_messages(prompt)
    else:
        body["prompt"] = prompt
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


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
    take_usage(body.get("usage"), reading)
    return reading
