"""The OpenAI-compatible request and response shapes (SPEC section 9): parsing, answers, stream chunks.

Only the shapes live here; :mod:`.openai_gateway` runs the requests through the same
gateway, queues and GPU workers as ``/v1/inference``. Parsing accepts what the
``openai`` SDK, ``vllm bench serve``, GuideLLM and AIPerf send and ignores fields it
does not know, as OpenAI servers do; a known field of the wrong type or range is a 400
that names it (``param``).

Chat messages become one prompt through the backend's chat template
(:meth:`~.backends.base.Backend.render_chat`): the engine's own where it has one, else
the plain template of :func:`~.backends.base.plain_chat_prompt`.

Stream chunks are encoded from a prefix and suffix fixed per request, with only the
token text passed through ``json.dumps``: a stream writes one chunk per token, and
building a whole dict per token cost a third of the server's streaming throughput.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from ..api_errors import ApiError
from ..backends.base import Generate, Generated

__all__ = ["DEFAULT_MAX_TOKENS", "LlmRequest", "Shapes", "parse_chat", "parse_completion"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat uses it too (the sim backend needs a length)
MAX_TOKENS_LIMIT = 32_768
MAX_PROMPTS = 256  # strings in one completions prompt list (vLLM takes any number; a bound keeps one request small)
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """A completions or chat request, validated: what to generate and how to answer."""

    chat: bool
    model: str
    generate: Generate
    stream: bool
    include_usage: bool
    more: tuple[Generate, ...] = ()  # the other prompts of a completions prompt list, answered as choices 1..n


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(name, f"'{name}' must be an integer from {low} to {high}")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be true or false")
    return value


def _common(body: dict[str, Any], prompt: str | list[int], chat: bool) -> LlmRequest:
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "'model' must be a string naming the model")
    if (n := body.get("n")) is not None and n != 1:
        raise _bad("n", "only n = 1 is supported")
    max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    min_tokens = _int(body, "min_tokens", 0, max_tokens) or 0
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise _bad("temperature", "'temperature' must be a number from 0 to 2")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "'stop' must be a non-empty string or a list of them")
    seed = _int(body, "seed", -(2**63), 2**64 - 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    generate = Generate(
        prompt,
        max_tokens,
        ignore_eos=_bool(body, "ignore_eos"),
        min_tokens=min_tokens,
        stop=tuple(stop or ()),
        temperature=None if temperature is None else float(temperature),
        seed=seed,
    )
    include_usage = _bool(options, "include_usage") if options else False
    return LlmRequest(chat, model, generate, _bool(body, "stream"), include_usage)


def parse_completion(body: Any) -> LlmRequest:
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a list of strings (not streamed:
    each is queued as a request of its own and answered as choice ``index`` i, as vLLM does; another gateway's
    ``--backend openai`` sends its batches so)."""
    if not isinstance(body, dict):
        raise ApiError(400, 'body must be a JSON object: {"model": str, "prompt": str, ...}')
    prompt = body.get("prompt")
    texts = isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    if texts and len(prompt) > MAX_PROMPTS:
        raise _bad("prompt", f"a prompt list holds 1 to {MAX_PROMPTS} strings")
    if texts and len(prompt) > 1 and body.get("stream"):
        raise _bad("prompt", "a streamed completion takes one prompt: send each prompt of the list on its own")
    rest = prompt[1:] if texts else []
    prompt = prompt[0] if texts else prompt
    ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids):
        raise _bad("prompt", "'prompt' must be a string, a list of strings, or a list of token ids")
    request = _common(body, prompt, chat=False)
    return dataclasses.replace(request, more=tuple(dataclasses.replace(request.generate, prompt=p) for p in rest))


def _text_parts(content: list) -> bool:
    return all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)


def parse_chat(body: Any) -> tuple[LlmRequest, list[dict[str, str]]]:
    """``POST /v1/chat/completions``: the messages (role, text content) and the request, prompt still empty."""
    if not isinstance(body, dict):
        raise ApiError(400, 'body must be a JSON object: {"model": str, "messages": [...], ...}')
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content}")
    plain: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: only text is served
            if not _text_parts(content):
                raise _bad("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or not isinstance(content, str | None):
            raise _bad("messages", f"messages[{i}] must be {{role: str, content: str}}")
        plain.append({"role": role, "content": content or ""})
    return _common(body, "", chat=True), plain


def usage(output: Generated) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` where the engine reports its prefix cache."""
    counts: dict[str, Any] = {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }
    if output.cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": output.cached_tokens}
    return counts


class Shapes:
    """The answer objects and stream chunks of one request (its id, creation time and model are fixed)."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.chat = chat
        self.head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        head = json.dumps(self.head)[:-1]  # '{"id": ..., "model": ...' without its closing brace
        if chat:
            self._first = f'data: {head}, "choices": [{{"index": 0, "delta": {{"role": "assistant", "content": '
            self._open = f'data: {head}, "choices": [{{"index": 0, "delta": {{"content": '
            self._close = '}, "logprobs": null, "finish_reason": '
        else:
            self._first = self._open = f'data: {head}, "choices": [{{"index": 0, "text": '
            self._close = ', "logprobs": null, "finish_reason": '
        self._head = head

    def chunks(self, pieces: list[str], first: bool, finish_reason: str | None) -> bytes:
        """One SSE event per token; the first of a chat carries the role, the last the finish reason."""
        out = []
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            opening = self._first if first and i == 0 else self._open
            reason = json.dumps(finish_reason) if i == last and finish_reason is not None else "null"
            out.append(f"{opening}{json.dumps(piece)}{self._close}{reason}}}]}}\n\n")
        return "".join(out).encode()

    def usage_chunk(self, output: Generated) -> bytes:
        return f'data: {self._head}, "choices": [], "usage": {json.dumps(usage(output))}}}\n\n'.encode()

    def error_chunk(self, err: ApiError) -> bytes:
        return f"data: {json.dumps({'error': err.body()})}\n\n".encode()

    def answer(self, *outputs: Generated) -> dict[str, Any]:
        """The non-streamed answer: a choice per output (a completions prompt list), usage summed over them."""
        choices = []
        for index, output in enumerate(outputs):
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": output.text}
            else:
                choice["text"] = output.text
            choices.append(choice | {"logprobs": None, "finish_reason": output.finish_reason})
        kind = "chat.completion" if self.chat else "text_completion"
        total = usage(outputs[0]) if len(outputs) == 1 else _summed_usage(outputs)
        return {**self.head, "object": kind, "choices": choices, "usage": total}


def _summed_usage(outputs: tuple[Generated, ...]) -> dict[str, Any]:
    counts = [usage(o) for o in outputs]
    total = {key: sum(c[key] for c in counts) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = [c["prompt_tokens_details"]["cached_tokens"] for c in counts if "prompt_tokens_details" in c]
    return total | ({"prompt_tokens_details": {"cached_tokens": sum(cached)}} if cached else {})
