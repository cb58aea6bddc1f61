"""The OpenAI-compatible upstream backend against a scripted upstream on 127.0.0.1.

The upstream answers choices in shuffled order (so mapping by ``index`` is tested),
or fails in each way an upstream can; every request of a failed batch must get 503
(504 for a hang) in bounded time, and the next batch must succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error
import urllib.request

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
        self.answered = 0  # prompts answered (a batch may be cut off by a drain: it must not be)
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
        if self.mode == "slow":
            await asyncio.sleep(0.3)
        self.answered += len(prompts)
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
        if self.mode == "down":
            return web.json_response({"error": {"message": "engine restarting"}}, status=503)
        return web.json_response({"data": [{"id": "upstream-model"}]})


@contextlib.asynccontextmanager
async def scripted_upstream():
    """A scripted upstream on 127.0.0.1: (its script, its URL); stopped on exit."""
    scripted = ScriptedUpstream()
    app = web.Application()
    app.add_routes([web.post("/v1/completions", scripted.completions), web.get("/v1/models", scripted.models)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield scripted, f"http://127.0.0.1:{port}"
    finally:
        scripted.release.set()
        await runner.cleanup()


@pytest.fixture
async def upstream():
    async with scripted_upstream() as running:
        yield running


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
        # One call a batch (on a busy machine the 25 may come in two batches); the empty input stays home.
        assert sorted(p for body in scripted.bodies for p in body["prompt"]) == sorted(inputs[:-1])
        assert len(scripted.bodies) <= 3

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


@pytest.fixture
async def second_upstream():
    async with scripted_upstream() as running:
        yield running


async def test_several_upstreams_are_one_gpu_worker_each_and_all_take_traffic(upstream, second_upstream, tmp_path):
    """``--upstream A,B`` (SPEC section 13): one worker per engine replica, each sending to its own; with
    steady traffic both replicas answer, and every answer is its own request's."""
    (first, first_url), (second, second_url) = upstream, second_upstream
    model = ServiceModel(max_wait_ms=5, max_batch=4, backpressure={"queue_limit": 1000})
    scenario = write_model_scenario(model, tmp_path / "m.toml")
    server_cm = running_server("--backend", "openai", "--upstream", f"{first_url},{second_url}/", "--scenario",
                               str(scenario))  # fmt: skip
    srv = await asyncio.to_thread(server_cm.__enter__)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{srv.url}/readyz") as resp:
            ready = await resp.json()
        listed = [{k: r[k] for k in ("url", "state", "gpus")} for r in ready["replicas"]]
        assert ready["gpus"] == 2 and listed == [
            {"url": first_url, "state": "serving", "gpus": [0]}, {"url": second_url, "state": "serving", "gpus": [1]}
        ]  # fmt: skip
        inputs = [f"prompt-{i}" for i in range(40)]
        answers = await send_all(srv.url, inputs)
        assert [s for s, _ in answers] == [200] * len(inputs)
        assert [b["output"] for _, b in answers] == [f"echo:{t[::-1]}" for t in inputs]
        per_replica = [sum(len(b["prompt"]) for b in s.bodies) for s in (first, second)]
        assert sum(per_replica) == len(inputs) and min(per_replica) > 0, per_replica
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)


def test_a_bad_upstream_in_the_list_is_one_line(tmp_path):
    from tests.helpers import run_cli

    done = run_cli("serve", "--backend", "openai", "--upstream", "http://127.0.0.1:9,127.0.0.1:10", timeout=60)
    assert done.returncode == 2 and "not a URL: '127.0.0.1:10'" in done.stderr and "Traceback" not in done.stderr


# -- replicas that register and leave while the server runs (SPEC section 13) ------------------------------


async def _internal(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, dict]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


def _replica_counts(metrics_text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "inferplan_replicas"
    }


@pytest.mark.parametrize("batching", ["static", "continuous"])
async def test_a_replica_registers_takes_traffic_and_leaves_drained(batching, upstream, second_upstream, tmp_path):
    """POST /internal/replicas adds a probed replica's worker; DELETE drains it: what it was running is answered,
    nothing new goes to it, and no request fails (batches, or requests passed through to a continuous engine)."""
    (first, first_url), (second, second_url) = upstream, second_upstream
    model = ServiceModel(
        max_wait_ms=5, max_batch=4, backpressure={"queue_limit": 1000}, batching=batching, max_num_seqs=4
    )
    scenario = write_model_scenario(model, tmp_path / "m.toml")
    server_cm = running_server("--backend", "openai", "--upstream", first_url, "--scenario", str(scenario))
    srv = await asyncio.to_thread(server_cm.__enter__)
    replicas = f"{srv.internal_url}/internal/replicas"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            status, joined = await _internal(session, "POST", replicas, json={"url": second_url + "/"})
            assert status == 201 and joined["url"] == second_url and joined["state"] == "serving"
            assert joined["gpus"] == [1]
            _, ready = await _internal(session, "GET", f"{srv.url}/readyz")
            assert ready["gpus"] == 2 and [r["url"] for r in ready["replicas"]] == [first_url, second_url]
            async with session.get(f"{srv.url}/metrics") as resp:
                assert _replica_counts(await resp.text()) == {"serving": 2, "unhealthy": 0, "draining": 0}
            inputs = [f"prompt-{i}" for i in range(40)]
            answers = await send_all(srv.url, inputs)
            assert [b["output"] for _, b in answers] == [f"echo:{t[::-1]}" for t in inputs]
            assert first.answered > 0 and second.answered > 0  # the new replica takes its share

            # Leave while busy: each of the first replica's batches takes 0.3 s; DELETE returns once it is drained.
            first.mode = "slow"
            load = asyncio.create_task(send_all(srv.url, [f"drain-{i}" for i in range(60)]))
            await asyncio.sleep(0.1)
            assert sum(len(b["prompt"]) for b in first.bodies) > first.answered  # it is running some of them
            status, left = await _internal(session, "DELETE", replicas, params={"url": first_url})
            answered_by_first = first.answered
            assert status == 200 and left == {"url": first_url, "state": "removed"}
            # every batch it was sent, it answered before the DELETE returned
            assert answered_by_first == sum(len(b["prompt"]) for b in first.bodies)
            drained = await load
            assert [s for s, _ in drained] == [200] * 60
            assert [b["output"] for _, b in drained] == ["echo:" + f"drain-{i}"[::-1] for i in range(60)]
            assert first.answered == answered_by_first  # nothing was sent to it after it left
            _, listed = await _internal(session, "GET", replicas)
            assert [r["url"] for r in listed["replicas"]] == [second_url]

            # Clear refusals: twice, unreachable, malformed, unknown.
            status, again = await _internal(session, "POST", replicas, json={"url": second_url})
            assert status == 409 and again["error"]["code"] == "replica_exists"
            status, dead = await _internal(session, "POST", replicas, json={"url": "http://127.0.0.1:9"})
            assert status == 422 and dead["error"]["code"] == "replica_unreachable"
            status, bad = await _internal(session, "POST", replicas, json={"url": "127.0.0.1:9", "workers": 0})
            assert status == 400 and "url" in bad["error"]["message"]
            status, unknown = await _internal(session, "DELETE", replicas, params={"url": first_url})
            assert status == 404 and unknown["error"]["code"] == "replica_unknown"

            # The last replica leaves: not ready, and a request gets 503 at once rather than a timeout.
            status, _ = await _internal(session, "DELETE", replicas, params={"url": second_url})
            assert status == 200
            status, ready = await _internal(session, "GET", f"{srv.url}/readyz")
            assert status == 503 and ready["error"]["code"] == "engine_unavailable"
            [(status, body)] = await send_all(srv.url, ["nobody"])
            assert status == 503 and body["error"]["code"] == "no_gpus"
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)
    assert srv.proc.returncode == 0


async def test_a_replica_that_stops_answering_its_probes_is_drained_then_serves_again(
    upstream, second_upstream, tmp_path
):
    (_, first_url), (second, second_url) = upstream, second_upstream
    model = ServiceModel(max_wait_ms=5, max_batch=4, backpressure={"queue_limit": 1000})
    scenario = write_model_scenario(model, tmp_path / "m.toml")
    server_cm = running_server("--backend", "openai", "--upstream", f"{first_url},{second_url}", "--scenario",
                               str(scenario), "--replica-check-s", "0.2")  # fmt: skip
    srv = await asyncio.to_thread(server_cm.__enter__)

    async def states(session) -> dict[str, str]:
        _, listed = await _internal(session, "GET", f"{srv.internal_url}/internal/replicas")
        return {r["url"]: r["state"] for r in listed["replicas"]}

    async def until(session, wanted: dict[str, str]) -> None:
        for _ in range(100):  # 10 s at most
            if await states(session) == wanted:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"replicas stayed {await states(session)}, not {wanted}")

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            second.mode = "down"
            await until(session, {first_url: "serving", second_url: "unhealthy"})
            before = second.answered
            answers = await send_all(srv.url, [f"p{i}" for i in range(20)])
            assert [s for s, _ in answers] == [200] * 20 and second.answered == before  # all on the healthy one
            second.mode = "ok"
            await until(session, {first_url: "serving", second_url: "serving"})
            _, listed = await _internal(session, "GET", f"{srv.internal_url}/internal/replicas")
            assert listed["replicas"][1]["gpus"] == [2]  # a new worker: ids are not reused
            answers = await send_all(srv.url, [f"q{i}" for i in range(40)])
            assert [s for s, _ in answers] == [200] * 40 and second.answered > before
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)


def test_the_sim_backend_has_no_replicas_to_register():
    with running_server() as srv:
        req = urllib.request.Request(
            f"{srv.internal_url}/internal/replicas", data=json.dumps({"url": "http://127.0.0.1:9"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)  # 127.0.0.1 only
        assert refused.value.code == 409 and json.load(refused.value)["error"]["code"] == "no_replicas"


@pytest.mark.parametrize(("routing", "spread"), [("prefix_affinity", False), ("round_robin", True)])
async def test_routing_by_prefix_sends_each_system_prompt_to_one_replica(routing, spread, upstream, second_upstream,
                                                                         tmp_path):  # fmt: skip
    """``--routing prefix_affinity`` over engine replicas that do not say what they cache: the pool counts the
    blocks it sent to each (``server/workers/prefix_index.py``), so every request of a system prompt goes where
    its first went; round robin sends the three prompts, taking turns, to both."""
    (first, first_url), (second, second_url) = upstream, second_upstream
    model = ServiceModel(batching="continuous", max_num_seqs=4, routing=routing)
    scenario = write_model_scenario(model, tmp_path / "m.toml")
    server_cm = running_server("--backend", "openai", "--upstream", f"{first_url},{second_url}", "--scenario",
                               str(scenario))  # fmt: skip
    srv = await asyncio.to_thread(server_cm.__enter__)
    try:
        systems = {name: " ".join(f"{name}{k}" for k in range(48)) for name in ("alpha", "beta", "gamma")}
        for i in range(18):  # one at a time: the choice is the rule's, not the timing's
            name = list(systems)[i % 3]
            answers = await send_all(srv.url, [f"{systems[name]} question {i} please answer"])
            assert answers[0][0] == 200
        where = {name: {n for n, s in enumerate((first, second)) for b in s.bodies for p in b["prompt"]
                        if p.startswith(systems[name])} for name in systems}  # fmt: skip
        assert all(len(replicas) == (2 if spread else 1) for replicas in where.values()), where
        assert len(first.bodies) > 0 and len(second.bodies) > 0, where  # both serve either way
    finally:
        await asyncio.to_thread(server_cm.__exit__, None, None, None)
