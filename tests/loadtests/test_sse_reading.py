"""Which SSE chunks are tokens: the rule behind every TTFT and ITL the load test measures.

The streams are the shapes real servers send (vLLM's one chunk per token, empty text
included; OpenAI's and our end marker; a chat role announcement), read through the same
line reader the Locust user uses, with a clock that ticks once per line.
"""

from __future__ import annotations

import itertools
import json

import pytest
from aiohttp import web
from infer_plan.core import ServiceModel
from infer_plan.loadtests.apis import read_stream
from infer_plan.server.backends.base import Generate
from infer_plan.server.backends.openai_upstream import OpenAIBackend, OpenAIOptions


def _read(events: list[dict]) -> tuple[list[float], list[str], int | None]:
    lines = [f"data: {json.dumps(e)}\n".encode() for e in events] + [b"data: [DONE]\n"]
    feed, clock = iter(lines), itertools.count()
    reading = read_stream(lambda: next(feed, b""), clock=lambda: float(next(clock)))
    assert reading.problem is None, reading.problem
    return reading.token_times, reading.text, reading.completion_tokens


def _text(piece: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": piece, "finish_reason": finish}]}


def _delta(finish: str | None = None, **delta: str) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 4}}


def test_an_empty_text_chunk_is_a_token_so_ttft_and_gaps_are_not_shifted():
    # vLLM: the first token's text held back (half a character), a later one too; the last carries the finish.
    times, text, usage = _read([_text(""), _text(" a"), _text(""), _text("b", "length"), USAGE])
    assert times == [0.0, 1.0, 2.0, 3.0] and len(times) == usage == 4
    assert "".join(text) == " ab"


def test_the_end_marker_and_the_usage_chunk_are_not_tokens():
    # OpenAI and our server: an empty chunk carries the finish reason after the last token.
    times, _, usage = _read([_text(" a"), _text(" b"), _text(" c"), _text(" d"), _text("", "stop"), USAGE])
    assert times == [0.0, 1.0, 2.0, 3.0] and usage == 4


def test_a_chat_role_announcement_is_not_a_token_but_a_role_with_the_first_token_is():
    announced = [_delta(role="assistant", content=""), _delta(content="x"), _delta(content=""), _delta("stop")]
    times, text, _ = _read(announced)
    assert times == [1.0, 2.0] and text == ["x", ""]  # the finish chunk's delta is {}: no token
    together = [_delta(role="assistant", content="x"), _delta(content="y", finish="length")]
    assert _read(together)[0] == [0.0, 1.0]


STREAMS = {
    "vllm, held-back text": [_text(""), _text(" a"), _text(""), _text("b", "length"), USAGE],
    "openai end marker": [_text(" a"), _text(" b"), _text(" c"), _text(" d"), _text("", "stop"), USAGE],
    "no usage": [_text("x"), _text(""), _text("y"), _text("", "stop")],
}


class _Sink:
    cancelled = False

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.output = None

    def token(self, piece: str) -> None:
        self.pieces.append(piece)

    def finish(self, output) -> None:
        self.output = output


@pytest.fixture
async def scripted_upstream():
    """An upstream on 127.0.0.1 that streams whichever events the test names, as SSE lines."""
    chosen: list[list[dict]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in chosen[-1]:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", chosen
    await runner.cleanup()


@pytest.mark.parametrize("name", list(STREAMS))
async def test_the_load_test_and_the_openai_backend_count_the_same_tokens(scripted_upstream, name):
    """One reader for both: the tokens a load test times are the ones our server forwards from an upstream."""
    url, chosen = scripted_upstream
    chosen.append(STREAMS[name])
    _, text, usage = _read(STREAMS[name])
    backend = OpenAIBackend(ServiceModel(), OpenAIOptions(upstream=url, served_model="m"))
    await backend.start()
    try:
        sink = _Sink()
        [output] = await backend.run_batch([Generate(prompt="p", max_tokens=4, sink=sink)], gpu=0)
    finally:
        await backend.close()
    assert sink.pieces == text and sink.output == output
    assert output.completion_tokens == (usage if usage is not None else len(text))
