"""Backend faults: one bad batch gets one clear error per request; the worker goes on serving."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from infer_plan.core import ServiceModel
from infer_plan.loadtests.target import write_model_scenario
from infer_plan.server.backends.sim_gpu import sim_output, sim_pieces
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import running_server
from tests.server.faulty import FAIL, HANG, RAISE, SHORT, STEP_CRASH

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    scenario = write_model_scenario(
        ServiceModel(request_timeout_s=TIMEOUT_S), tmp_path_factory.mktemp("faults") / "model.toml", gpus=1
    )
    with running_server(
        "--backend", "tests.server.faulty:FaultyBackend", "--served-model-name", "sim", "--scenario", str(scenario)
    ) as srv:
        yield srv


async def send_batch(url: str, inputs: list[str]) -> list[tuple[int, dict, float, dict]]:
    """All inputs at once, so they share one batch on the idle GPU; (status, body, seconds, headers) each."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(text: str):
            t0 = time.perf_counter()
            async with session.post(
                f"{url}/v1/inference",
                json={"model": "sim", "input": text},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp:
                return resp.status, await resp.json(), time.perf_counter() - t0, dict(resp.headers)

        return list(await asyncio.gather(*(one(t) for t in inputs)))


def faults_by_kind(metrics_text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "inferplan_backend_faults":
            return {s.labels["kind"]: s.value for s in family.samples if s.name.endswith("_total")}
    return {}


@pytest.mark.parametrize(
    ("poison", "status", "kind"),
    [(RAISE, 503, "exception"), (FAIL, 503, "error"), (SHORT, 503, "wrong_count"), (HANG, 504, "timeout")],
)
async def test_every_request_of_a_failed_batch_gets_one_error_and_later_batches_succeed(
    faulty_server, poison, status, kind
):
    async with aiohttp.ClientSession() as session, session.get(f"{faulty_server.url}/metrics") as resp:
        before = faults_by_kind(await resp.text())

    inputs = [f"{kind}-{i}" for i in range(19)] + [poison]
    answers = await send_batch(faulty_server.url, inputs)
    assert [a[0] for a in answers] == [status] * len(inputs)
    for _, body, seconds, headers in answers:
        assert body["error"]["code"] in {"backend_error", "timeout"} and body["error"]["message"]
        assert seconds < TIMEOUT_S + 1.0  # nobody waits past the deadline
        if status == 503:
            assert headers["Retry-After"] == "1"

    # The worker recovered: the next batch is served, each request its own output.
    # (After a hang the GPU is busy until the batch deadline cancels the backend call.)
    healthy = [f"after-{kind}-{i}" for i in range(20)]
    answers = await send_batch(faulty_server.url, healthy)
    assert [a[0] for a in answers] == [200] * 20
    assert [a[1]["output"] for a in answers] == [sim_output(t) for t in healthy]

    async with aiohttp.ClientSession() as session, session.get(f"{faulty_server.url}/metrics") as resp:
        after = faults_by_kind(await resp.text())
    assert after.get(kind, 0) - before.get(kind, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 1


@pytest.fixture(scope="module")
def faulty_continuous_server(tmp_path_factory):
    model = ServiceModel(batching="continuous", decode_step_ms=20.0, request_timeout_s=10.0)
    scenario = write_model_scenario(model, tmp_path_factory.mktemp("step-faults") / "model.toml", gpus=1)
    with running_server(
        "--backend", "tests.server.faulty:FaultyBackend", "--served-model-name", "sim", "--scenario", str(scenario)
    ) as srv:
        yield srv


async def test_a_step_loop_that_dies_answers_its_running_requests_at_once_and_serves_again(faulty_continuous_server):
    """Continuous batching: the engine's step loop dies with four answers of 200 steps (4 s) under way. Each is
    answered 503 with Retry-After when it dies, not at its 10 s deadline, and the GPU serves again."""
    url = faulty_continuous_server.url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def complete(prompt: str, tokens: int) -> tuple[int, dict, float, dict]:
            t0 = time.perf_counter()
            async with session.post(
                f"{url}/v1/completions",
                json={"model": "sim", "prompt": prompt, "max_tokens": tokens},
                headers={"Authorization": "Bearer dev-paid"},
            ) as resp:
                return resp.status, await resp.json(), time.perf_counter() - t0, dict(resp.headers)

        async with session.get(f"{url}/metrics") as resp:
            before = faults_by_kind(await resp.text())
        running = [asyncio.create_task(complete(f"long {i}", 200)) for i in range(4)]
        await asyncio.sleep(0.3)
        crashed = await complete(STEP_CRASH, 1)
        answers = [crashed, *await asyncio.gather(*running)]
        for status, body, seconds, headers in answers:
            assert status == 503 and body["error"]["code"] == "backend_error", body
            assert headers["Retry-After"] == "1"
            assert seconds < 2.5  # when the loop died (0.3 s in), not at the 4 s answer or the 10 s deadline

        healthy = await asyncio.gather(*(complete(f"after {i}", 5) for i in range(6)))
        assert [a[0] for a in healthy] == [200] * 6
        assert [a[1]["choices"][0]["text"] for a in healthy] == ["".join(sim_pieces(f"after {i}", 5)) for i in range(6)]
        async with session.get(f"{url}/metrics") as resp:
            after = faults_by_kind(await resp.text())
    assert after.get("exception", 0) - before.get("exception", 0) == 1
