"""The simulated GPU: sleeps the service model's cycle per batch, answers deterministically.

It lets the reference server run anywhere and makes measured latency comparable with
the simulator's: both take their batch time from the same :class:`ServiceModel`
(``static_batch_ms``: the cycle, and the batch's steps when tokens are modelled).

Its tokens are words: a prompt has as many tokens as whitespace-separated words (or as
token ids, when it is given as a list), and an answer of n tokens is n words, so the
token counts a client sees in ``usage`` are exact. An ``/v1/inference`` request asks
for no length and gets the one-token answer :func:`sim_output`, as always.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from ...core.model import ServiceModel
from .base import Backend, BackendOptions, Generate, Generated

__all__ = ["SimBackend", "sim_output", "sim_tokens", "sim_words"]


def sim_output(text: str) -> str:
    """The deterministic answer to one input, so clients can check they got their own."""
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"sim:{digest}:{len(text)}"


def sim_tokens(prompt: str | list[int]) -> int:
    """The sim backend's token count of a prompt: its token ids, or its whitespace-separated words."""
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def sim_words(prompt: str | list[int], count: int) -> str:
    """The deterministic answer of ``count`` tokens (words) to ``prompt``."""
    seed = int(hashlib.blake2s(str(prompt).encode("utf-8", "surrogatepass"), digest_size=4).hexdigest(), 16)
    return "".join(f" w{(seed + 7919 * j) % 10007}" for j in range(count))


@Backend.register("sim")
class SimBackend(Backend):
    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        super().__init__(model, options)
        self._uniform = random.Random(0).random  # draws quantiles of a measured cycle_jitter

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        outputs = [_answer(request) for request in requests]
        prompt = sum(o.prompt_tokens for o in outputs)
        generated = [o.completion_tokens for o in outputs]
        # The hold and the steps: the server's queues always overlap assembly with GPU work.
        ms = self.model.static_batch_ms(len(requests), prompt, sum(generated), max(generated, default=1))
        if self.model.cycle_jitter:
            ms *= float(self.model.jitter(self._uniform()))
        if ms > 0:
            await asyncio.sleep(ms / 1000.0)
        return outputs


def _answer(request: Generate) -> Generated:
    prompt_tokens = sim_tokens(request.prompt)
    if request.max_tokens is None:  # /v1/inference: the one-token answer
        return Generated(sim_output(str(request.prompt)), prompt_tokens, 1)
    return Generated(sim_words(request.prompt, request.max_tokens), prompt_tokens, request.max_tokens)
