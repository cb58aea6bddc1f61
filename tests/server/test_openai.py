"""The OpenAI-compatible surface of a real server process, driven by the real ``openai`` SDK and raw HTTP.

The sim backend runs the token model in real time: a scenario with slow steps makes the
stream's timing visible (each token at the end of its step), and exact token counts make
``usage`` checkable.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest
from infer_plan.core import Backpressure, ServiceModel
from infer_plan.loadtests.target import write_model_scenario
from infer_plan.server.backends.base import plain_chat_prompt
from infer_plan.server.backends.sim_gpu import sim_pieces, sim_words
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import running_server
from tests.server.faulty import MID_STREAM

pytestmark = pytest.mark.timeout(180)

# Steps slow enough to see: 40 ms per decode step, a prefill of 2 ms per token, no fixed cycle.
STEPPED = ServiceModel(
    pcie_in_ms=0, kernel_ms=0, pcie_out_ms=0, max_wait_ms=10, decode_step_ms=40, prefill_ms_per_token=2
)


def scenario(tmp_path: Path, model: ServiceModel = STEPPED, gpus: int = 1) -> str:
    return str(write_model_scenario(model, tmp_path / "model.toml", gpus=gpus))


@pytest.fixture
def stepped(tmp_path):
    with running_server("--scenario", scenario(tmp_path)) as srv:
        yield srv


def client(srv, key: str = "dev-paid") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=30)


async def test_sdk_completions_and_chat_streamed_and_not_with_exact_usage(stepped):
    sdk = client(stepped)
    prompt = "one two three four"
    done = await sdk.completions.create(model="sim", prompt=prompt, max_tokens=5)
    assert done.choices[0].text == sim_words(prompt, 5) and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (4, 5, 9)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = await sdk.chat.completions.create(model="sim", messages=messages, max_completion_tokens=3)
    rendered = plain_chat_prompt(messages)
    assert chat.choices[0].message.content == sim_words(rendered, 3) and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(rendered.split()) and chat.usage.completion_tokens == 3

    start = time.perf_counter()
    arrivals, texts, usage, reasons = [], [], None, []
    stream = await sdk.completions.create(
        model="sim", prompt=prompt, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        arrivals.append(time.perf_counter() - start)
        texts.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert texts == sim_pieces(prompt, 6)  # one chunk per token
    assert reasons == [None] * 5 + ["length"]  # the finish reason rides on the last token
    assert usage.completion_tokens == 6 and usage.prompt_tokens == 4
    # Each token at the end of its step: 40 ms apart (a batch of one), the first after wait + prefill.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.030 <= g <= 0.080 for g in gaps), gaps
    assert 0.050 - 0.005 <= arrivals[0] <= 0.150, arrivals[0]  # 10 ms wait + 40 + 4 x 2 ms prefill

    roles, contents = [], []
    async for chunk in await sdk.chat.completions.create(model="sim", messages=messages, max_tokens=3, stream=True):
        roles.append(chunk.choices[0].delta.role)
        contents.append(chunk.choices[0].delta.content)
    assert roles == ["assistant", None, None] and "".join(contents) == sim_words(rendered, 3)
    await sdk.close()


async def test_a_prompt_list_is_one_request_per_prompt_answered_by_index(stepped):
    """As vLLM does (and as another gateway's ``--backend openai`` sends its batches): choice i answers prompt i."""
    sdk = client(stepped)
    prompts = ["one two three", "four five", "six"]
    done = await sdk.completions.create(model="sim", prompt=prompts, max_tokens=4)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.text for c in done.choices] == [sim_words(p, 4) for p in prompts]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (6, 12)  # summed over the prompts
    with pytest.raises(openai.BadRequestError, match="streamed completion takes one prompt"):
        await sdk.completions.create(model="sim", prompt=prompts, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="1 to 256"):
        await sdk.completions.create(model="sim", prompt=["x"] * 257, max_tokens=4)
    await sdk.close()


async def test_sdk_errors_are_its_typed_exceptions(tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys]\n"k-one" = { tier = "paid", rps = 0.01, burst = 1 }\n')
    with running_server("--keys", str(keys)) as srv:
        with pytest.raises(openai.AuthenticationError):
            await client(srv, "wrong").completions.create(model="sim", prompt="x")
        sdk = client(srv, "k-one")
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.completions.create(model="gpt-4", prompt="x")
        assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.completions.create(model="sim", prompt="x", max_tokens=0)
        assert bad.value.body["param"] == "max_tokens" and bad.value.body["type"] == "invalid_request_error"
        await sdk.completions.create(model="sim", prompt="x")  # the key's one token
        with pytest.raises(openai.RateLimitError) as limited:
            await sdk.completions.create(model="sim", prompt="x", stream=True)
        assert limited.value.response.headers["Retry-After"] == "100"
        assert limited.value.body["code"] == "key_rate_limited"
        models = await client(srv, "k-one").models.list()
        assert [m.id for m in models.data] == ["sim"]
        await sdk.close()


async def raw_stream(session: aiohttp.ClientSession, url: str, key: str, body: dict) -> tuple[int, dict, bytes]:
    async with session.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_the_stream_is_sse_events_then_done_and_bad_fields_name_their_param(stepped):
    async with aiohttp.ClientSession() as session:
        status, headers, raw = await raw_stream(
            session, stepped.url, "dev-free", {"model": "sim", "prompt": "a b", "max_tokens": 3, "stream": True}
        )
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = raw.decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert [c["choices"][0]["text"] for c in chunks] == sim_pieces("a b", 3)
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        for body, param in [
            ({"model": "sim", "prompt": 5}, "prompt"),
            ({"model": "sim", "prompt": "x", "stream": "yes"}, "stream"),
            ({"model": "sim", "prompt": "x", "temperature": 9}, "temperature"),
            ({"model": "sim", "prompt": "x", "stop": [""]}, "stop"),
            ({"prompt": "x"}, "model"),
        ]:
            status, _, raw = await raw_stream(session, stepped.url, "dev-paid", body)
            error = json.loads(raw)["error"]
            assert status == 400 and error["param"] == param and error["code"] == "bad_request", (body, error)
        async with session.get(f"{stepped.url}/health") as resp:
            assert resp.status == 200


async def test_overload_sheds_free_streams_before_any_byte_while_enterprise_streams(tmp_path):
    # One GPU, 1 s batches of one, and a queue of 4 whose yellow zone starts at 2.
    slow = ServiceModel(max_batch=1, max_wait_ms=0, kernel_ms=1000, backpressure=Backpressure(queue_limit=4))
    with running_server("--scenario", scenario(tmp_path, slow)) as srv:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            body = {"model": "sim", "prompt": "fill", "max_tokens": 1}
            fillers = [asyncio.create_task(raw_stream(session, srv.url, "dev-enterprise", body)) for _ in range(4)]
            await asyncio.sleep(0.5)  # one runs, three wait: past the yellow zone
            stream = {"model": "sim", "prompt": "free", "max_tokens": 2, "stream": True}
            status, headers, raw = await raw_stream(session, srv.url, "dev-free", stream)
            assert status == 429 and headers["Content-Type"].startswith("application/json")
            assert int(headers["Retry-After"]) >= 1 and json.loads(raw)["error"]["type"] == "rate_limit_error"
            status, headers, raw = await raw_stream(session, srv.url, "dev-enterprise", stream)
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
            assert [s for s, _, _ in await asyncio.gather(*fillers)] == [200] * 4


async def test_a_client_that_leaves_mid_stream_costs_one_log_line_and_the_next_are_served(tmp_path):
    with running_server("--scenario", scenario(tmp_path)) as srv:
        async with aiohttp.ClientSession() as session:
            body = {"model": "sim", "prompt": "long answer", "max_tokens": 50, "stream": True}
            async with session.post(
                f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer dev-paid"}
            ) as resp:
                first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"data: {")
                resp.close()  # hang up after the first token, 49 to go
            await asyncio.sleep(0.3)  # a few more steps: the server writes to a closed connection
            sdk = client(srv)
            answers = await asyncio.gather(*(sdk.completions.create(model="sim", prompt=f"n{i}") for i in range(5)))
            assert all(a.usage.completion_tokens == 16 for a in answers)
            await sdk.close()
            await asyncio.sleep(2.2)  # the abandoned sequence's batch ends
            text = await (await session.get(f"{srv.url}/metrics")).text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("inferplan_client_disconnects_total", (("stage", "stream"),))] == 1
        assert samples[("inferplan_generation_tokens_total", (("tier", "paid"),))] == 5 * 16
        assert samples[("inferplan_time_to_first_token_seconds_count", (("tier", "paid"),))] >= 1
        assert srv.terminate() == 0
        log = srv.log_text()
    assert "Traceback" not in log and log.count("client disconnected mid-stream") == 1


# Continuous batching: two sequence slots, 30 ms steps, a small KV cache.
CONTINUOUS = ServiceModel(
    batching="continuous", max_num_seqs=2, kv_cache_tokens=200, decode_step_ms=30, prefill_ms_per_token=0.5
)


async def stream_times(session, url: str, key: str, prompt: str, tokens: int) -> tuple[float, list[float]]:
    """(when the request was sent, when each token arrived), on the monotonic clock."""
    body = {"model": "sim", "prompt": prompt, "max_tokens": tokens, "stream": True}
    sent = time.perf_counter()
    arrivals = []
    async with session.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        while (event := await resp.content.readuntil(b"\n\n")) != b"data: [DONE]\n\n":
            arrivals.append(time.perf_counter())
            assert event.startswith(b"data: {")
    return sent, arrivals


async def test_continuous_batching_admits_between_steps_by_tier(tmp_path):
    with running_server("--scenario", scenario(tmp_path, CONTINUOUS)) as srv:
        async with aiohttp.ClientSession() as session:
            sent, alone = await stream_times(session, srv.url, "dev-paid", "a b c d", 5)
            # No assembly wait: the first token after one step (30 ms + 4 x 0.5 ms prefill), then 30 ms apart.
            assert 0.025 <= alone[0] - sent <= 0.080, alone[0] - sent
            gaps = [b - a for a, b in itertools.pairwise(alone)]
            assert all(0.020 <= g <= 0.045 for g in gaps), gaps

            # A long sequence runs; a second joins at the next step instead of waiting for the first to end.
            long_run = asyncio.create_task(stream_times(session, srv.url, "dev-free", "long", 20))
            await asyncio.sleep(0.1)
            sent, joined = await stream_times(session, srv.url, "dev-free", "short", 2)
            assert joined[0] - sent <= 0.080
            _, long_tokens = await long_run
            assert joined[-1] < long_tokens[-1]  # it left while the long one ran on

            # Both slots busy: of the two that wait, enterprise gets the first free slot though it came last.
            busy = [asyncio.create_task(stream_times(session, srv.url, "dev-free", f"busy {i}", i)) for i in (5, 8)]
            await asyncio.sleep(0.05)
            free = asyncio.create_task(stream_times(session, srv.url, "dev-free", "free waits", 3))
            await asyncio.sleep(0.02)
            enterprise = asyncio.create_task(stream_times(session, srv.url, "dev-enterprise", "vip", 3))
            (_, free_tokens), (_, vip_tokens) = await asyncio.gather(free, enterprise)
            await asyncio.gather(*busy)
            assert free_tokens[0] - vip_tokens[0] >= 0.060  # the free one waited for the 8-token sequence to end

            body = {"model": "sim", "prompt": "too long " * 100, "max_tokens": 16}
            async with session.post(
                f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer dev-paid"}
            ) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and error["code"] == "context_length_exceeded"
        assert srv.terminate() == 0


# Engine overheads (SPEC section 12), large beside asyncio's timer so they stand out: 60 ms + 1 ms a prompt
# token before admission, 40 ms of host time in the admitting step, 15 ms a streamed token, 30 ms steps.
OVERHEADS = ServiceModel(
    batching="continuous", decode_step_ms=30, request_overhead_ms=60, tokenize_ms_per_token=1, output_token_ms=15,
    admit_ms_per_request=40,
)  # fmt: skip


async def test_the_sim_backend_emulates_engine_overheads_as_the_simulator_times_them(tmp_path):
    prompt = " ".join(f"w{i}" for i in range(20))  # 20 tokens: 80 ms before the first step
    with running_server("--scenario", scenario(tmp_path, OVERHEADS)) as srv:
        async with aiohttp.ClientSession() as session:
            await stream_times(session, srv.url, "dev-paid", "warm up", 2)
            sent, tokens = await stream_times(session, srv.url, "dev-paid", prompt, 6)
        assert srv.terminate() == 0
    ttft = tokens[0] - sent  # worked case: 60 + 1 x 20 + (30 + 40) + 15 = 165 ms; timers never fire early
    assert 0.163 <= ttft <= 0.230, ttft
    gaps = sorted(b - a for a, b in itertools.pairwise(tokens))  # each one step plus one token's cost: 45 ms
    assert 0.040 <= gaps[len(gaps) // 2] <= 0.065, gaps


async def test_a_short_prompt_overtakes_a_long_one_in_the_front_end_as_the_simulator_orders_them(tmp_path):
    """One sequence slot; a 100-token prompt (160 ms in the front end), then 10 ms later a 2-token one (62 ms): the
    short one is ready first, so it runs first and the long one waits for its answer, in the server as in the
    simulator (a front end tokenises side by side; a FIFO head that is not ready must not hold the others)."""
    from infer_plan.sim.engines.engine import simulate_arrivals
    from infer_plan.sim.inputs.arrivals import Arrivals

    engine = OVERHEADS.model_copy(update={"max_num_seqs": 1, "admit_ms_per_request": 0, "output_token_ms": 0})
    long, short = " ".join(f"w{i}" for i in range(100)), "a b"
    with running_server("--scenario", scenario(tmp_path, engine)) as srv:
        async with aiohttp.ClientSession() as session:
            await stream_times(session, srv.url, "dev-paid", "warm up", 2)

            async def later(delay_s: float, prompt: str) -> tuple[float, list[float]]:
                await asyncio.sleep(delay_s)
                return await stream_times(session, srv.url, "dev-paid", prompt, 8)

            (long_sent, long_tokens), (short_sent, short_tokens) = await asyncio.gather(
                later(0.0, long), later(0.010, short)
            )
        assert srv.terminate() == 0
    lengths = {"prompt_tokens": np.array([100, 2], dtype=np.int32), "output_tokens": np.full(2, 8, dtype=np.int32)}
    run = Arrivals(times=np.array([0.0, short_sent - long_sent]), tiers=np.ones(2, dtype=np.int8), **lengths)
    predicted = simulate_arrivals(engine, run, gpus=1).records.first_token - run.times
    measured = np.array([long_tokens[0] - long_sent, short_tokens[0] - short_sent])
    # Simulated: the short one's first token at 62 + 30 = 92 ms after it was sent; the long one's after the short
    # one's 8 steps and its own: 10 + 62 + 8 x 30 + 30 = 342 ms (the old head-of-line rule: 190 and 430 ms).
    assert short_tokens[-1] < long_tokens[0], (short_tokens, long_tokens)
    assert np.all(measured >= predicted - 0.002) and np.all(measured <= predicted + 0.060), (measured, predicted)


# The extended step model (SPEC section 12), its context terms large beside asyncio's timer: 1 ms per context token
# a decoding sequence reads, 0.1 ms per prompt token squared.
CONTEXT = ServiceModel(batching="continuous", decode_step_ms=20, decode_ms_per_kv_token=1, prefill_ms_per_token_sq=0.1)


async def test_the_sim_backend_grows_its_steps_with_the_context_as_the_simulator_does(tmp_path):
    p, o = 20, 12
    prompt = " ".join(f"w{i}" for i in range(p))
    with running_server("--scenario", scenario(tmp_path, CONTEXT)) as srv:
        async with aiohttp.ClientSession() as session:
            await stream_times(session, srv.url, "dev-paid", "warm up", 2)
            sent, tokens = await stream_times(session, srv.url, "dev-paid", prompt, o)
        assert srv.terminate() == 0
    ttft = tokens[0] - sent  # worked case: 20 + 0.1 x 20^2 = 60 ms; timers never fire early
    assert 0.058 <= ttft <= 0.120, ttft
    # Gap k is 20 + (p + k) ms: 506 ms from the first token to the last, five later gaps 25 ms longer than five
    # earlier ones (steps keep their deadlines, so a late wake-up shortens the next gap, not the sum).
    assert 0.500 <= tokens[-1] - tokens[0] <= 0.600, tokens
    earlier, later = tokens[6] - tokens[1], tokens[11] - tokens[6]
    assert later - earlier >= 0.010, (earlier, later)


# Prefix caching (SPEC section 13), the prefill large beside asyncio's timer: 20 ms steps, 1 ms a prompt token.
CACHING = ServiceModel(batching="continuous", decode_step_ms=20, prefill_ms_per_token=1, prefix_caching=True)


async def test_the_sim_backend_skips_the_prefill_of_a_cached_system_prompt_and_says_so_in_usage(tmp_path):
    """Section 13's worked case through the server: a 192-word system prompt (12 blocks of 16) and 8 words of
    the request's own. The first prefills 200 tokens (20 + 200 = 220 ms to its first token), the second only
    its own 8 (20 + 8 = 28 ms), and the usage of each says how many prompt tokens were cached."""
    system = " ".join(f"s{i}" for i in range(192))
    first, second = f"{system} {' '.join(['a'] * 8)}", f"{system} {' '.join(['b'] * 8)}"
    with running_server("--scenario", scenario(tmp_path, CACHING)) as srv:
        async with aiohttp.ClientSession() as session:
            sent, cold = await stream_times(session, srv.url, "dev-paid", first, 3)
            sent_again, warm = await stream_times(session, srv.url, "dev-paid", second, 3)
        sdk = client(srv)
        again = await sdk.completions.create(model="sim", prompt=second, max_tokens=2)
        other = await sdk.completions.create(model="sim", prompt="another prompt entirely", max_tokens=2)
        assert srv.terminate() == 0
    assert 0.218 <= cold[0] - sent <= 0.290, cold[0] - sent  # timers never fire early
    assert 0.026 <= warm[0] - sent_again <= 0.080, warm[0] - sent_again
    assert again.usage.prompt_tokens == 200 and again.usage.prompt_tokens_details.cached_tokens == 192
    assert other.usage.prompt_tokens_details.cached_tokens == 0


async def chat_turn(sdk: openai.AsyncOpenAI, messages: list[dict[str, str]], tokens: int) -> tuple[float, str, int]:
    """One streamed chat turn through the SDK: (seconds to its first token, its answer, its cached prompt tokens)."""
    sent, first, parts, cached = time.perf_counter(), None, [], -1
    stream = await sdk.chat.completions.create(
        model="sim", messages=messages, max_completion_tokens=tokens, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    assert first is not None
    return first - sent, "".join(parts), cached


async def test_a_conversations_second_turn_prefills_only_its_new_message(tmp_path):
    """Section 13's worked case with a session, through the server and the SDK: turn 1 renders to 64 words
    ("user:", 62 of the message, "assistant:") and is answered in 64 tokens, 8 full blocks of 16 together. Turn 2
    sends the whole history and a message of 8 words: 138 words, of which the 128 of turn 1's prompt and answer
    are cached (the answer's blocks too, as vLLM keeps them), so it prefills 10 (20 + 10 ms to its first token;
    64 cached and 94 ms if only prompts were kept)."""
    first = {"role": "user", "content": " ".join(f"m{i}" for i in range(62))}
    with running_server("--scenario", scenario(tmp_path, CACHING)) as srv:
        sdk = client(srv)
        cold, answer, cached_first = await chat_turn(sdk, [first], 64)
        history = [first, {"role": "assistant", "content": answer}, {"role": "user", "content": "a b c d e f g h"}]
        warm, _, cached_second = await chat_turn(sdk, history, 4)
        assert srv.terminate() == 0
    assert (cached_first, cached_second) == (0, 128)
    assert 0.084 <= cold <= 0.150, cold  # 20 + 64 ms
    assert 0.030 <= warm <= 0.075, warm


# Paged KV (SPEC section 13): six blocks of 16 words, 20 ms steps.
PAGED = ServiceModel(batching="continuous", decode_step_ms=20, kv_cache_tokens=96, kv_policy="paged")


@pytest.mark.parametrize("caching", [False, True])
async def test_the_sim_backend_preempts_the_latest_arrival_and_resumes_its_stream(tmp_path, caching):
    """tests/sim/test_paged_kv.py's worked case through the server: two streams of 32 prompt words and 40 tokens
    start together; at the step where the first needs a fourth block none is free, the second (the later) is
    preempted, and its stream pauses until the first has ended, then goes on where it stopped: every token
    once, in order, and the pause where the simulator puts it. With prefix caching too, the same, and the blocks
    of the second's prompt stay cached after it (a preempted or finished sequence's full blocks are kept), so
    the same prompt sent again finds all but its last token cached."""
    prompts = [" ".join(f"{name}{i}" for i in range(32)) for name in ("a", "b")]
    model = PAGED.model_copy(update={"prefix_caching": caching})
    with running_server("--scenario", scenario(tmp_path, model)) as srv:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(stream_times(session, srv.url, "dev-paid", prompts[0], 40))
            await asyncio.sleep(0.005)
            second = asyncio.create_task(stream_times(session, srv.url, "dev-paid", prompts[1], 40))
            (_, ahead), (sent, later) = await asyncio.gather(first, second)
            sdk = client(srv)
            whole = await sdk.completions.create(model="sim", prompt=prompts[1], max_tokens=40)
        assert srv.terminate() == 0
    assert len(ahead) == len(later) == 40 and whole.choices[0].text == sim_words(prompts[1], 40)
    if caching:
        assert whole.usage.prompt_tokens_details.cached_tokens == 31
    gaps = [b - a for a, b in itertools.pairwise(later)]
    pause = max(range(len(gaps)), key=gaps.__getitem__)
    # 33 + 1 tokens fit three blocks: the first needs its fourth at its 16th token; the second, one step behind,
    # has 15 by then; it resumes after the first's last token, its prompt and 15 tokens recomputed
    assert pause == 14, gaps
    assert later[0] - sent <= 0.080 and later[pause + 1] > ahead[-1], (later[pause + 1], ahead[-1])
    assert gaps[pause] >= 0.4  # the first's 25 remaining steps of 20 ms


async def test_an_engine_failure_after_the_first_token_is_an_sse_error_event_then_done():
    with running_server("--backend", "tests.server.faulty:FaultyBackend") as srv:
        async with aiohttp.ClientSession() as session:
            body = {"model": "sim", "prompt": MID_STREAM, "max_tokens": 4, "stream": True}
            status, _, raw = await raw_stream(session, srv.url, "dev-paid", body)
            assert status == 200  # the stream had begun: the status is spent
            events = raw.decode().split("\n\n")
            assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == " first"
            error = json.loads(events[1].removeprefix("data: "))["error"]
            assert error["code"] == "backend_error" and error["type"] == "server_error"
            assert events[2:] == ["data: [DONE]", ""]
            status, _, raw = await raw_stream(session, srv.url, "dev-paid", {"model": "sim", "prompt": "ok"})
            assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 16  # and it serves on
        assert srv.terminate() == 0
        assert "Traceback" not in srv.log_text()
