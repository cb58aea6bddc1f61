"""The simulated GPU: sleeps the service model's cycle per batch, answers deterministically.

It lets the reference server run anywhere and makes measured latency comparable with
the simulator's: both take their batch time from the same :class:`ServiceModel`
(``static_batch_ms``: the cycle, and the batch's steps when tokens are modelled).

Its tokens are words: a prompt has as many tokens as whitespace-separated words (or as
token ids, when it is given as a list), and an answer of n tokens is n words, so the
token counts a client sees in ``usage`` are exact. An ``/v1/inference`` request asks
for no length and gets the one-token answer :func:`sim_output`, as always. A batch that
holds a streamed request runs step by step in real time (``_run_steps``), so each
client sees its tokens when the token model says the step that makes them ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from ...core.model import ServiceModel
from .base import Backend, BackendOptions, Generate, Generated

__all__ = ["SimBackend", "sim_output", "sim_pieces", "sim_tokens", "sim_words"]


def sim_output(text: str) -> str:
    """The deterministic answer to one input, so clients can check they got their own."""
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"sim:{digest}:{len(text)}"


def sim_tokens(prompt: str | list[int]) -> int:
    """The sim backend's token count of a prompt: its token ids, or its whitespace-separated words."""
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def sim_words(prompt: str | list[int], count: int) -> str:
    """The deterministic answer of ``count`` tokens (words) to ``prompt``."""
    return "".join(sim_pieces(prompt, count))


def sim_pieces(prompt: str | list[int], count: int) -> list[str]:
    """The answer's tokens one by one: ``" w<n>"``, a number drawn from the prompt's digest."""
    seed = int(hashlib.blake2s(str(prompt).encode("utf-8", "surrogatepass"), digest_size=4).hexdigest(), 16)
    return [f" w{(seed + 7919 * j) % 10007}" for j in range(count)]


@Backend.register("sim")
class SimBackend(Backend):
    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        super().__init__(model, options)
        self._uniform = random.Random(0).random  # draws quantiles of a measured cycle_jitter

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        answers = [_answer(request) for request in requests]
        outputs = [output for output, _ in answers]
        factor = float(self.model.jitter(self._uniform())) if self.model.cycle_jitter else 1.0
        if any(request.sink is not None for request in requests):
            await self._run_steps(requests, answers, factor)
            return outputs
        prompt = sum(o.prompt_tokens for o in outputs)
        generated = [o.completion_tokens for o in outputs]
        # The hold and the steps: the server's queues always overlap assembly with GPU work.
        ms = self.model.static_batch_ms(len(requests), prompt, sum(generated), max(generated, default=1)) * factor
        if ms > 0:
            await asyncio.sleep(ms / 1000.0)
        return outputs

    async def _run_steps(
        self, requests: list[Generate], answers: list[tuple[Generated, list[str]]], factor: float
    ) -> None:
        """The batch step by step in real time, each streamed request's token sent at the end of its step.

        The same times as ``static_batch_ms`` (SPEC section 10): the hold before the steps,
        one prefill step over all prompts, decode steps while any sequence still generates,
        then ``pcie_out``. A sequence's stream closes after its own last token; the GPU is
        held until the longest is done. Deadlines are absolute, so the sleeps do not drift.
        """
        model, n = self.model, len(requests)
        loop = asyncio.get_running_loop()
        lengths = [len(pieces) for _, pieces in answers]
        prompt = sum(output.prompt_tokens for output, _ in answers)
        deadline = loop.time() + (model.batch_hold_ms(n) - model.pcie_out_ms) * factor / 1000.0
        for step in range(max(lengths, default=0)):
            running = sum(length > step for length in lengths)
            deadline += model.step_ms(prompt if step == 0 else 0, running) * factor / 1000.0
            if (delay := deadline - loop.time()) > 0:
                await asyncio.sleep(delay)
            for request, (output, pieces) in zip(requests, answers, strict=True):
                sink = request.sink
                if sink is None or step >= len(pieces) or sink.cancelled:
                    continue  # not streamed, done already, or its client left: the batch runs on regardless
                sink.token(pieces[step])
                if step == len(pieces) - 1:
                    sink.finish(output)
        deadline += model.pcie_out_ms * factor / 1000.0
        if (delay := deadline - loop.time()) > 0:
            await asyncio.sleep(delay)


def _answer(request: Generate) -> tuple[Generated, list[str]]:
    """The output and its tokens; a stop string ends it early (its token counts, its text does not)."""
    prompt_tokens = sim_tokens(request.prompt)
    if request.max_tokens is None:  # /v1/inference: the one-token answer
        text = sim_output(str(request.prompt))
        return Generated(text, prompt_tokens, 1), [text]
    pieces = sim_pieces(request.prompt, request.max_tokens)
    if request.stop and not request.ignore_eos:
        text = ""
        for i, piece in enumerate(pieces):
            cut = min((j for j in ((text + piece).find(s) for s in request.stop) if j >= 0), default=-1)
            if cut >= 0 and i + 1 >= request.min_tokens:
                final = (text + piece)[:cut]
                return Generated(final, prompt_tokens, i + 1, "stop"), [*pieces[:i], final[len(text) :]]
            text += piece
    return Generated("".join(pieces), prompt_tokens, request.max_tokens), pieces
