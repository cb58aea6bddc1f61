"""vLLM inside a Ray actor (``serve --backend ray --ray-engine vllm``): the tiny local model, a local Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.helpers import VLLM_DTYPE, VLLM_ENV, build_tiny_model, running_server

pytest.importorskip("ray")
pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.timeout(600)]

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


async def test_vllm_in_a_ray_actor_answers_batches_and_streams(tiny_model):
    with running_server(
        "--backend", "ray", "--ray-engine", "vllm", "--model", str(tiny_model), *VLLM_DTYPE,
        "--served-model-name", "tiny", "--max-tokens", "8", "--gpus", "1", env={**VLLM_ENV, **RAY_ENV}, startup_s=400,
    ) as srv:  # fmt: skip
        async with aiohttp.ClientSession() as session:

            async def infer(text: str) -> tuple[int, dict]:
                body = {"model": "tiny", "input": text}
                async with session.post(
                    f"{srv.url}/v1/inference", json=body, headers={"Authorization": "Bearer dev-paid"}
                ) as resp:
                    return resp.status, await resp.json()

            texts = [f"the quick brown fox {i}" for i in range(6)]
            first = await asyncio.gather(*(infer(t) for t in texts))
            again = await asyncio.gather(*(infer(t) for t in reversed(texts)))
            async with session.get(f"{srv.url}/readyz") as resp:
                ready = await resp.json()
        assert [s for s, _ in first] == [200] * 6 and [s for s, _ in again] == [200] * 6
        # Greedy decoding: each text gets the same answer whatever batch it lands in.
        assert [p["output"] for _, p in first] == [p["output"] for _, p in reversed(again)]
        assert ready["actors_live"] == 1 and ready["actors"] == 1

        sdk = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="dev-paid", max_retries=0, timeout=120)
        pieces = []
        stream = await sdk.completions.create(
            model="tiny", prompt="once upon a time", max_tokens=6, stream=True, extra_body={"ignore_eos": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
        whole = await sdk.completions.create(
            model="tiny", prompt="once upon a time", max_tokens=6, extra_body={"ignore_eos": True}
        )
        assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].text  # token by token, same text
    assert srv.proc.returncode == 0
