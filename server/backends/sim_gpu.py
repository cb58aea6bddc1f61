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
With ``prefix_caching`` a continuous GPU keys each prompt's full blocks of words by
content and keeps them in the simulator's cache rule (:mod:`infer_plan.core.prefix_cache`):
a prompt that starts with one sent before prefills only the rest, and its answer's
``usage`` says how many tokens were cached. A finished answer's full blocks are kept too
(keyed as the prompt's words and the answer's), so a conversation's next turn, sent with
the whole history, prefills little more than its new message.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...core.model import KvPolicy, ServiceModel
from ...core.prefix_cache import PrefixCache, blocks_needed, cached_tokens
from ...core.prompt_blocks import content_keys
from ...core.tokens import word_tokens
from ..api_errors import ApiError
from .base import Backend, BackendOptions, Generate, Generated

__all__ = ["SimBackend", "sim_output", "sim_pieces", "sim_words"]


def sim_output(text: str) -> str:
    """The deterministic answer to one input, so clients can check they got their own."""
    digest = hashlib.blake2s(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"sim:{digest}:{len(text)}"


def sim_words(prompt: str | list[int], count: int) -> str:
    """The deterministic answer of ``count`` tokens (words) to ``prompt``."""
    return "".join(sim_pieces(prompt, count))


def sim_pieces(prompt: str | list[int], count: int) -> list[str]:
    """The answer's tokens one by one: ``" w<n>"``, a number drawn from the prompt's digest."""
    seed = int(hashlib.blake2s(str(prompt).encode("utf-8", "surrogatepass"), digest_size=4).hexdigest(), 16)
    return [f" w{(seed + 7919 * j) % 10007}" for j in range(count)]


@dataclass(slots=True)
class _Sequence:
    """A request running under continuous batching: what is left to prefill and which token comes next."""

    pending: Any  # the queue's Pending: its request and its future
    output: Generated
    pieces: list[str]
    prefill_left: int
    emitted: int = 0
    chunk: int = 0  # prompt tokens prefilled in the current step
    fill: int = 0  # prompt tokens it prefills: all of them, less a cached prefix
    segments: list[Any] = field(default_factory=list)  # prefix caching: its prompt's blocks, one segment each
    holds: list[int] = field(default_factory=list)  # the leading ones it found cached
    blocks: int = 0
    prefilled: bool = False
    context: int = 0  # tokens its prefill computes KV for: the prompt; a preempted one's answer so far too
    held: int = 0  # paged KV: blocks it holds
    preempted: bool = False

    @property
    def reserve(self) -> int:
        """KV tokens held from admission to the end (prompt and whole output), so it is never evicted."""
        return self.output.prompt_tokens + len(self.pieces)


class SimBackend(Backend):
    name: ClassVar[str] = "sim"
    steps_itself = True

    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        super().__init__(model, options)
        self._uniform = random.Random(0).random  # draws quantiles of a measured cycle_jitter
        self.caches: dict[int, PrefixCache] = {}  # prefix caching: each GPU's blocks, kept while it serves
        self.paused: dict[int, _Sequence] = {}  # paged KV: preempted sequences by id(pending), whoever resumes them
        self.step_ends: dict[int, float] = {}  # each GPU's last step end (loop time): idle_wake_ms after a pause

    def cached_blocks(self, gpu: int, request: Generate) -> int | None:
        cache = self.caches.get(gpu)
        if cache is None:
            return 0 if self.model.prefix_caching else None
        return sum(cache.hits(_segments(request.prompt, [], self.model.kv_block_tokens)))

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

    async def run_continuous(self, gpu: int, feed: Any) -> None:
        """:meth:`_step_loop`; if the loop dies, its GPU's cache goes with it (the dead loop's sequences held blocks
        in it): the pool answers what it ran and starts the loop again, as an engine restarts with an empty cache."""
        try:
            await self._step_loop(gpu, feed)
        except Exception:
            self.caches.pop(gpu, None)
            raise

    async def _step_loop(self, gpu: int, feed: Any) -> None:
        """The continuous step model in real time, as the simulator runs it (``sim/references/step_reference.py``).

        Before every step, admit waiting requests by tier while a sequence slot and KV room
        remain (the first that does not fit blocks the rest; one that could never fit is
        refused with 400); run one step (prefill chunks within ``max_batched_tokens``, one
        token for every sequence whose prompt is done); send each streamed token; answer
        each request when its last token is out. Returns when idle and ``feed.wait()`` says so.
        With paged KV (SPEC section 13) the decoding sequences first take the block their next
        token needs, in admission order, preempting the lowest tier's latest arrival back to
        the head of its tier's queue when none is free (:meth:`_grow`); a preempted one
        resumes where its client's stream paused, its prompt and answer so far recomputed.
        """
        model = self.model
        loop = asyncio.get_running_loop()
        kv_budget = model.kv_cache_tokens if model.kv_cache_tokens is not None else math.inf
        block = model.kv_block_tokens
        paged = model.kv_policy is KvPolicy.PAGED
        if paged:
            kv_budget = model.kv_cache_blocks
        cache = self.caches.setdefault(gpu, PrefixCache(model.kv_cache_blocks)) if model.prefix_caching else None
        running: list[_Sequence] = []
        kv = 0
        deadline = loop.time()
        send = _Delivery(loop, model.output_token_ms / 1000.0)
        delayed = bool(model.request_overhead_ms or model.tokenize_ms_per_token)
        while True:
            if paged:
                kv = self._grow(running, kv, feed, cache)
            joins_at = math.inf  # when the next request leaves the engine's front end, if none is admissible yet
            while len(running) < model.max_num_seqs:
                head, joins_at = _admissible(feed, model, loop.time()) if delayed else (feed.head(), math.inf)
                if head is None:
                    break
                output, pieces = _answer(head.request)
                seq = _Sequence(head, output, pieces, output.prompt_tokens, fill=output.prompt_tokens)
                seq.context = output.prompt_tokens
                if paged:
                    seq = self._resumed(head, seq)  # a preempted one recomputes its answer so far
                    seq.fill = seq.prefill_left = seq.context = seq.output.prompt_tokens + seq.emitted
                    if blocks_needed(seq.output.prompt_tokens, len(seq.pieces), block) > kv_budget:
                        feed.deliver(feed.take(head), _too_long(seq.reserve, kv_budget * block))
                        continue
                if cache is not None:
                    fits = _admit_cached(seq, head.request.prompt, cache, block, paged)
                    if fits is None:
                        feed.deliver(feed.take(head), _too_long(seq.blocks * block, cache.capacity * block))
                        continue
                    if not fits:
                        if seq.emitted:
                            self.paused[id(head)] = seq
                        break
                elif paged:
                    if kv + -(-(seq.fill + 1) // block) > kv_budget:
                        if seq.emitted:
                            self.paused[id(head)] = seq
                        break
                    seq.held = -(-(seq.fill + 1) // block)
                elif kv + seq.reserve > kv_budget:
                    if seq.reserve <= kv_budget:
                        break
                    feed.deliver(feed.take(head), _too_long(seq.reserve, kv_budget))
                    continue
                feed.take(head)
                running.append(seq)
                kv += seq.held if paged else seq.reserve
            if not running:
                if joins_at < math.inf:
                    await asyncio.sleep(joins_at - loop.time())
                elif not await feed.wait():
                    return
                deadline = loop.time()  # an idle GPU starts its next step when the request arrives
                continue
            budget = model.max_batched_tokens
            in_step = []
            for seq in running:
                seq.chunk = min(seq.prefill_left, budget)
                budget -= seq.chunk
                if seq.prefill_left == 0 or seq.chunk > 0:
                    in_step.append(seq)
            joining = sum(1 for s in in_step if s.chunk and s.prefill_left == s.fill)
            spread = float(model.jitter(self._uniform())) if model.cycle_jitter else 1.0
            step_ms = model.step_ms(
                sum(s.chunk for s in in_step), len(in_step), joining,
                # the extended model's context (SPEC section 12), as the simulator's reference counts it
                kv_tokens=sum(s.output.prompt_tokens + s.emitted for s in in_step if not s.chunk),
                prefill_sq=sum(s.chunk * s.chunk for s in in_step),
                prefill_context=sum(s.chunk * (s.context - s.prefill_left) for s in in_step),
            )  # fmt: skip
            idle_s = deadline - self.step_ends.get(gpu, -math.inf)  # a step that starts an idle engine wakes it
            deadline += (step_ms * spread + model.wake_ms(idle_s)) / 1000.0
            if (delay := deadline - loop.time()) > 0:
                await asyncio.sleep(delay)
            else:
                deadline = loop.time()  # behind (a busy loop): no catching up in zero-length steps
                await asyncio.sleep(0)  # steps of no time still let the gateway admit and write
            self.step_ends[gpu] = deadline
            for seq in in_step:
                seq.prefill_left -= seq.chunk
                if seq.prefill_left > 0:
                    continue  # more prompt chunks to go: no token yet
                if cache is not None and seq.chunk:  # its prompt's blocks are computed: others may share them
                    cache.prefilled(seq.holds, seq.segments)
                    seq.prefilled = True
                seq.emitted += 1
                seq.context += 1  # its KV holds the token from now on
                send.token(seq)
            for seq in [s for s in running if s.emitted == len(s.pieces) or _abandoned(s)]:
                running.remove(seq)
                kv -= seq.held if paged else seq.reserve
                if cache is not None:  # admission order: the cache's LRU order is the simulator's
                    _release(cache, seq, block, paged)
                send.end(seq, feed)

    def _resumed(self, head: Any, fresh: _Sequence) -> _Sequence:
        """``head``'s sequence as it was preempted, else ``fresh``; the preempted ones whose clients left since
        are forgotten (a live entry keeps its request alive, so ``id`` keys cannot be reused meanwhile)."""
        if self.paused:
            for key in [k for k, s in self.paused.items() if s.pending.future.done()]:
                del self.paused[key]
        return self.paused.pop(id(head), fresh)

    def _grow(self, running: list[_Sequence], kv: int, feed: Any, cache: PrefixCache | None) -> int:
        """Paged KV before a step: each decoding sequence, in admission order, takes the block its next token
        needs; with none free, the running sequence of the lowest tier, latest arrival, goes back to the head of
        its tier's queue, its blocks freed (with prefix caching its full ones stay cached): the simulator's rule,
        ``sim/engines/step_engine.py``. Returns the blocks held after (without a cache; the cache counts its own)."""
        model = self.model
        block, budget = model.kv_block_tokens, model.kv_cache_blocks

        def reached(s: _Sequence) -> float:  # the latest arrival: the latest out of the engine's front end
            return s.pending.arrived + model.admission_delay_ms(s.output.prompt_tokens) / 1000.0

        for seq in list(running):
            while seq in running and seq.prefill_left == 0 and seq.held < -(-(seq.context + 1) // block):
                if cache is not None and cache.free() >= 1:  # cached blocks nobody holds are evicted for it
                    cache.take(1)
                    seq.held += 1
                    continue
                if cache is None and kv < budget:
                    seq.held += 1
                    kv += 1
                    continue
                victim = max(running, key=lambda s: (s.pending.tier, reached(s), running.index(s)))
                running.remove(victim)
                kv -= victim.held
                if cache is not None:  # its full blocks stay cached, as a finished sequence's do
                    _release(cache, victim, block, paged=True)
                victim.held, victim.preempted, victim.prefilled = 0, True, False
                self.paused[id(victim.pending)] = victim
                feed.put_back(victim.pending)
        return kv


def _admit_cached(
    seq: _Sequence, prompt: str | list[int], cache: PrefixCache, block: int, paged: bool = False
) -> bool | None:
    """Take ``seq``'s blocks, its leading cached ones shared (SPEC section 13); False: it does not fit now;
    None: it never could. Paged, it takes the blocks up to its next token, and a preempted one's context is its
    prompt and answer so far, whose blocks its preemption left cached."""
    seq.segments = _segments(prompt, seq.pieces[: seq.emitted] if paged else [], block)
    seq.blocks = blocks_needed(seq.output.prompt_tokens, len(seq.pieces), block)
    if seq.blocks > cache.capacity:
        return None
    context = seq.output.prompt_tokens + (seq.emitted if paged else 0)
    need = -(-(context + 1) // block) if paged else seq.blocks
    seq.holds = cache.hits(seq.segments)
    if not cache.fits(seq.holds, seq.segments, need):
        return False
    cache.admit(seq.holds, seq.segments, need)
    seq.held, seq.prefilled = need if paged else 0, False
    cached = cached_tokens(sum(seq.holds), context, block)
    seq.prefill_left = seq.fill = context - cached
    if not seq.preempted:  # what its first admission found, as an engine reports it
        seq.output.cached_tokens = cached
    return True


def _release(cache: PrefixCache, seq: _Sequence, block: int, paged: bool) -> None:
    """``seq`` leaves (answered, abandoned or preempted): once prefilled, the full blocks of its answer so far
    stay cached beside its prompt's, keyed by content as the prompt's are (so a conversation's next turn, or the
    sequence recomputed after a preemption, finds them); before that, only the hits it shared."""
    segments = seq.segments
    if seq.prefilled:
        answer = _segments(seq.pending.request.prompt, seq.pieces[: seq.emitted], block)[len(segments) :]
        segments = cache.keep_answer(segments, answer)
    cache.release(segments, seq.held if paged else seq.blocks, None if seq.prefilled else seq.holds)


def _segments(prompt: str | list[int], answer: list[str], block: int) -> list[tuple[Any, int]]:
    """The blocks of a prompt and the first tokens of its answer as cache segments: a chain, every block its own
    key."""
    words = prompt if isinstance(prompt, list) else prompt.split()
    return [(key, 1) for key in content_keys([*words, *(piece.strip() for piece in answer)], block)]


class _Delivery:
    """A sequence's tokens and answer on their way to the client, ``output_token_ms`` each behind its step.

    The engine's steps do not wait for that cost (SPEC section 12): the k-th token is
    sent k lags after the step that made it, as the simulator times it. Without a lag
    everything is sent at once, in the step's own turn of the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lag_s: float) -> None:
        self.loop, self.lag_s = loop, lag_s

    def token(self, seq: _Sequence) -> None:
        if seq.pending.request.sink is not None:
            self._later(seq.emitted, _send_token, seq.pending.request.sink, seq.pieces[seq.emitted - 1])

    def end(self, seq: _Sequence, feed: Any) -> None:
        self._later(seq.emitted, _answer_sequence, seq, feed)

    def _later(self, tokens: int, callback: Any, *args: Any) -> None:
        if self.lag_s:
            self.loop.call_later(tokens * self.lag_s, callback, *args)
        else:
            callback(*args)


def _send_token(sink: Any, piece: str) -> None:
    if not sink.cancelled:
        sink.token(piece)


def _answer_sequence(seq: _Sequence, feed: Any) -> None:
    sink = seq.pending.request.sink
    if sink is not None and not sink.cancelled and seq.emitted == len(seq.pieces):
        sink.finish(seq.output)
    feed.deliver(seq.pending, seq.output)


def _admissible(feed: Any, model: ServiceModel, now: float) -> tuple[Any, float]:
    """The request the simulator would admit now, else when the next may be ready (SPEC section 12).

    A request is in the engine's front end (HTTP, tokenisation) for ``admission_delay_ms``
    after it arrived, and only then joins the waiting room: by tier, then in the order they
    became ready, so a short prompt overtakes a long one sent just before it (a front end
    tokenises requests side by side), and a later tier's ready request goes before an
    earlier tier's that is not (``sim/engines/engine.py: admission_order``). Returns
    (request or None, a time no later than when the next one is ready).
    """
    joins_at = math.inf
    fixed_s = model.request_overhead_ms / 1000.0  # the least any request stays in the front end
    for queue in feed.waiting():
        chosen = None
        for pending in queue:  # oldest first: once one arrived too late to be ready, so did the rest
            if pending.arrived + fixed_s > now:
                joins_at = min(joins_at, pending.arrived + fixed_s)
                break
            if pending.ready is None:
                pending.ready = pending.arrived + model.admission_delay_ms(word_tokens(pending.request.prompt)) / 1e3
            if pending.ready > now:
                joins_at = min(joins_at, pending.ready)
            elif chosen is None or pending.ready < chosen.ready:
                chosen = pending
        if chosen is not None:
            return chosen, math.inf
    return None, joins_at


def _abandoned(seq: _Sequence) -> bool:
    """The client left mid-stream or gave up waiting: the slot and its KV are freed at once."""
    sink = seq.pending.request.sink
    return (sink is not None and sink.cancelled) or seq.pending.future.done()


def _too_long(reserve: int, kv_budget: float) -> ApiError:
    return ApiError(
        400,
        f"prompt and max_tokens need {reserve} tokens of KV cache; one GPU holds {kv_budget:g}",
        code="context_length_exceeded",
        param="max_tokens",
    )


def _answer(request: Generate) -> tuple[Generated, list[str]]:
    """The output and its tokens; a stop string ends it early (its token counts, its text does not)."""
    prompt_tokens = word_tokens(request.prompt)
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
