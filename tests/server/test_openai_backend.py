"""The OpenAI-compatible upstream backend against a scripted upstream on 127.0.0.1.

The upstream answers choices in shuffled order (so mapping by ``index`` is tested),
or fails in each way an upstream can; every request of a failed batch must get 503
(504 for a hang) in bounded time, and the next batch must succeed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import openai
import pytest
from aiohttp import web
from infer_plan.core import ServiceModel
from infer_plan.loadtests.target import write_model_scenario

from tests.helpers import running_server

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 2.0


class ScriptedUpstream:
    def __init__(self) -> None:
        self.mode = "ok"
        self.bodies: list[dict] = []
        self.release = asyncio.Event()  # ends a hung answer at teardown

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body.get("stream"):
            return await self.stream(request, body)
        prompts = body["prompt"]
        choices = [{"index": i, "text": f"echo:{p[::-1]}", "finish_reason": "length"} for i, p in enumerate(prompts)]
        random.Random(len(self.bodies)).shuffle(choices)
        if self.mode == "status":
            return web.json_response({"error": {"message": "engine died"}}, status=500)
        if self.mode == "short":
            choices = choices[:-1]
        if self.mode == "garbage":
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        if self.mode == "hang":
            await asyncio.wait_for(self.release.wait(), 60)
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "choices": choices})

    async def stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        """A streamed answer, as vLLM sends it: three tokens 20 ms apart, then usage, then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ("echo:", body["prompt"][::-1], "!"):
            chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": "stop" if piece == "!" else None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.02)
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "upstream-model"}]})


@pytest.fixture
async def upstream():
    scripted = ScriptedUpstream()
    app = web.Application()
    app.add_routes([web.post("/v1/completions", scripted.completions), web.get("/v1/models", scripted.models)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield scripted, f"http://127.0.0.1:{port}"
    scripted.release.set()
    await runner.cleanup()


async def send_all(url: str, inputs: list[str]) -> list[tuple[int, dict]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(text: str):
            async with session.post(
                f"{url}/v1/inference",
                json={"model": "upstream-model", "input": text},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp:
                return resp.status, await resp.json()

        return list(await asyncio.gather(*(one(t) for t in inputs)))


async def test_openai_backend_maps_choices_by_index_and_fails_whole_batches(upstream, tmp_path):
    scripted, upstream_url = upstream
    scenario = write_model_scenario(ServiceModel(request_timeout_s=TIMEOUT_S), tmp_path / "m.toml", gpus=1)
    args = ["--backend", "openai", "--upstream", upstream_url, "--max-tokens", "7", "--scenario", str(scenario)]
    # The server's process must not block the test's loop, which also runs the upstream.
    server_cm = running_server(*args)
    srv = await asyncio.to_thread(server_cm.__enter__)
    try:
        inputs = [f"prompt-{i}" for i in range(25)] + [""]
        answers = await send_all(srv.url, inputs)
        assert [s for s, _ in answers] == [200] * len(inputs)
        assert [b["output"] for _, b in answers] == [f"echo:{t[::-1]}" for t in inputs[:-1]] + [""]
        sent = scripted.bodies[-1]
        assert sent["model"] == "upstream-model" and sent["max_tokens"] == 7 and sent["temperature"] == 0.0
        assert sorted(sent["prompt"]) == sorted(inputs[:-1])  # one call for the batch; the empty input stays home

        for mode, status in [("status", 503), ("short", 503), ("garbage", 503), ("hang", 504)]:
            scripted.mode = mode
            started = asyncio.get_running_loop().time()
            answers = await send_all(srv.url, [f"{mode}-{i}" for i in range(10)])
            assert [s for s, _ in answers] == [status] * 10, (mode, answers[0])
            assert asyncio.get_running_loop().time() - started < TIMEOUT_S + 1.5
            scripted.mode = "ok"
            await asyncio.sleep(TIMEOUT_S if mode == "hang" else 0)  # the hung batch holds its GPU until its deadline
            recovered = await send_all(srv.url, [f"after-{mode}"])
            assert (
                recovered == [(200, recovered[0][1])] and recovered[0][1]["output"] == f"echo:{f'after-{mode}'[::-1]}"
            )
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)


async def test_unreachable_upstream_gives_503_not_a_hang(tmp_path):
    scenario = write_model_scenario(ServiceModel(request_timeout_s=TIMEOUT_S), tmp_path / "m.toml", gpus=1)
    with running_server(
        "--backend", "openai", "--upstream", "http://127.0.0.1:9", "--model", "m", "--scenario", str(scenario)
    ) as srv:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{srv.url}/v1/inference",
                json={"model": "m", "input": "x"},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp,
        ):
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "backend_error"


async def test_a_streamed_request_gets_its_own_upstream_stream_token_by_token_with_its_usage(upstream, tmp_path):
    scripted, upstream_url = upstream
    scenario = write_model_scenario(ServiceModel(max_wait_ms=0), tmp_path / "m.toml", gpus=1)
    server_cm = running_server("--backend", "openai", "--upstream", upstream_url, "--scenario", str(scenario))
    srv = await asyncio.to_thread(server_cm.__enter__)
    try:
        sdk = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="dev-paid", max_retries=0, timeout=30)
        pieces, times, usage, reasons = [], [], None, []
        stream = await sdk.completions.create(
            model="upstream-model", prompt="abc", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
                continue
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
            times.append(time.perf_counter())
        # The upstream's usage comes after its last token: the finish reason rides on an empty last chunk.
        assert pieces == ["echo:", "cba", "!", ""] and reasons == [None, None, None, "stop"]
        assert times[-1] - times[0] >= 0.03  # as the upstream sent them, not all at the end
        assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3)  # the upstream's own count
        sent = scripted.bodies[-1]
        assert sent["stream"] is True and sent["prompt"] == "abc" and sent["stream_options"] == {"include_usage": True}
        done = await sdk.completions.create(model="upstream-model", prompt="xyz", max_tokens=3)
        assert done.choices[0].text == "echo:zyx" and scripted.bodies[-1]["prompt"] == ["xyz"]  # not streamed: a batch
        await sdk.close()
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)
