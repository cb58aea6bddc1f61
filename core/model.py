"""The service model: one parameters object shared by the simulator, the planner and the server.

The numbers come from the system design infer-plan was born from. A batch of up to
``max_batch`` requests leaves the batcher when a GPU is free *and* either the batch is
full or its oldest request has waited ``max_wait_ms`` (:mod:`.dispatch`); the GPU then
spends ``pcie_in_ms + kernel_ms + pcie_out_ms`` on it whatever its size ("1 string or
100 strings, same"), plus ``per_item_ms`` per request when a calibrated profile says so.

The token-level model (SPEC section 10) refines that cycle: a batch also runs *steps*,
each emitting one token per sequence and lasting ``decode_step_ms +
prefill_ms_per_token * (prompt tokens prefilled) + decode_ms_per_seq * (sequences)``
(:meth:`ServiceModel.step_ms`, the form BLIS fits). With ``batching = "static"`` the
steps run inside the batch cycle; with ``"continuous"`` there is no batch cycle at all,
only steps, admitting waiting requests between them. With every token coefficient at
0 a static batch is exactly the fixed cycle above.

A continuous engine also spends time on each request outside its steps (SPEC section
12, BLIS's "alpha" terms): HTTP, tokenisation and scheduling before the request can
join a step (``request_overhead_ms + tokenize_ms_per_token x prompt``), and the
detokenisation and write of each streamed token (``output_token_ms``). They add to
every TTFT, ITL and E2E but cost the GPU nothing, so throughput is unchanged. One
per-request cost does hold the engine up: ``admit_ms_per_request``, the host time the
engine's loop spends on each request it takes in (vLLM's engine core adds a request
between steps; where the front end shares the engine's host, its HTTP and tokenisation
contend there too). It lengthens the step that admits the request, so it costs
throughput like any step term. A static
batch's calibrated fixed cost already holds its requests' front-end work (calibration
times whole batches end to end), so the static engine leaves these terms out.

Keeping every consumer on this one frozen object is what makes a simulated P95, a
planned GPU count and a measured P95 comparable: they are answers about the same
service. The formulas derived from it (the cycle, per-GPU throughput, the load factor)
are methods here and nowhere else.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .dispatch import DispatchRule
from .slos import Slos, nest_slo_aliases
from .tiers import Tier

__all__ = [
    "AutoscalePolicy", "Backpressure", "Batching", "Faults", "KvPolicy", "Routing", "ServiceModel", "TokenShape",
]  # fmt: skip


class Batching(StrEnum):
    STATIC = "static"  # the design's batch cycle: a batch holds its GPU until its longest sequence is done
    CONTINUOUS = "continuous"  # vLLM, SGLang, TGI: sequences join and leave between steps


class KvPolicy(StrEnum):
    """How a continuous GPU holds KV for its running sequences (SPEC section 13)."""

    RESERVE = "reserve"  # prompt + whole answer taken at admission: never preempted (section 10)
    PAGED = "paged"  # blocks taken as the sequence grows; none free: the lowest tier's latest is preempted (vLLM)


class Routing(StrEnum):
    """Which replica a request goes to (SPEC section 13; ``core/routing.py``)."""

    SHARED_QUEUE = "shared_queue"  # one waiting room; the next replica with room takes the head (our server's pool)
    ROUND_ROBIN = "round_robin"  # each replica in turn, at arrival
    LEAST_LOADED = "least_loaded"  # fewest running + waiting, at arrival
    PREFIX_AFFINITY = "prefix_affinity"  # longest cached prefix among the replicas not much busier (llm-d)


@dataclass(frozen=True, slots=True)
class TokenShape:
    """Mean prompt and output lengths of a workload: what the back-of-envelope arithmetic needs."""

    prompt_tokens: float
    output_tokens: float
    cached_tokens: float = 0.0  # of the prompt, found in the prefix cache: no prefill work (SPEC section 13)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backpressure(_Frozen):
    """Admission zones on total queue depth: 429 early, cheapest tier first (:mod:`.admission`).

    The hard limit defaults to four full batches per serving GPU: past that even an
    enterprise request would wait four GPU cycles (~440 ms) in the queue, which cannot
    meet a 500 ms P95 once assembly and the cycle itself are added.
    """

    queue_limit: int | None = Field(
        default=None,
        gt=0,
        description="total queued requests at which all tiers are shed; None: 4 x max_batch per serving GPU",
    )
    yellow: float = Field(default=0.5, gt=0, le=1, description="share of the limit at which free is shed")
    red: float = Field(default=0.75, gt=0, le=1, description="share of the limit at which free and paid are shed")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After sent with a 429")

    @model_validator(mode="after")
    def _ordered(self) -> Backpressure:
        if not self.yellow <= self.red:
            raise ValueError(f"backpressure zones must satisfy yellow <= red (got {self.yellow} > {self.red})")
        return self

    def thresholds(self, serving_gpus: int, max_batch: int) -> tuple[int, int, int]:
        """Queue depths at which the yellow, red and full zones begin."""
        limit = self.queue_limit if self.queue_limit is not None else 4 * max_batch * max(serving_gpus, 1)
        return (max(1, int(limit * self.yellow)), max(1, int(limit * self.red)), limit)


class AutoscalePolicy(_Frozen):
    """Scale-up as the design states; scale-down is infer-plan's own conservative rule.

    Up: when ``load_factor`` (counted against serving plus provisioning GPUs, so a cold
    start in progress is not ordered twice) stays above ``scale_up_load`` for
    ``scale_up_after_s``, provision one GPU; it serves after the cold start.
    Down: when the load would stay under ``scale_down_load`` even with one GPU fewer,
    for ``scale_down_after_s``, release one GPU, never going below ``min_gpus``.
    """

    enabled: bool = False
    scale_up_load: float = Field(default=0.80, gt=0)
    scale_up_after_s: float = Field(default=120.0, gt=0)
    scale_down_load: float = Field(default=0.60, gt=0)
    scale_down_after_s: float = Field(default=600.0, gt=0)
    min_gpus: int = Field(default=1, ge=1)
    max_gpus: int = Field(default=1000, ge=1)
    tick_s: float = Field(default=5.0, gt=0, description="how often the autoscaler measures the offered rate")


class Faults(_Frozen):
    """GPU failures and repairs, exponential with the given means; off when mtbf_s is None."""

    mtbf_s: float | None = Field(default=None, gt=0)
    mttr_s: float = Field(default=600.0, gt=0)


class ServiceModel(_Frozen):
    """Every parameter of the batched inference service (SPEC section 2)."""

    max_batch: int = Field(default=100, ge=1, le=100_000)
    max_wait_ms: float = Field(default=40.0, ge=0)
    pcie_in_ms: float = Field(default=5.0, ge=0)
    kernel_ms: float = Field(default=100.0, ge=0)
    pcie_out_ms: float = Field(default=5.0, ge=0)
    per_item_ms: float = Field(default=0.0, ge=0)
    cycle_jitter: tuple[float, ...] = Field(
        default=(),
        description="multipliers at evenly spaced quantiles 0..1 of the GPU's unit of work, measured by calibrate: "
        "a batch cycle (static), a step (continuous); empty: each takes exactly its formula's time",
    )
    gpus: int | None = Field(default=None, ge=1, le=100_000, description="fleet size; None: the planner's answer")
    shared_queue_ms: float = Field(
        default=0.0,
        ge=0,
        description="time a request spends on the shared (Redis) queue's path: the enqueue and reply round trips "
        "of `serve --redis`, measured by benchmarks/bench_redis.py; 0 for one process. Instances sharing one "
        "queue are otherwise one pool of their GPUs, which is what `gpus` counts",
    )
    tiers: dict[str, float] = Field(default_factory=lambda: {"enterprise": 0.1, "paid": 0.3, "free": 0.6})
    slos: Slos = Field(default_factory=Slos, description="the objectives every plan, gate and sweep holds")
    max_load: float = Field(default=0.70, gt=0, le=1)
    cold_start_s: float = Field(default=300.0, ge=0)
    overlap: bool = Field(default=True, description="False: assembly holds the GPU too (the design's 150 ms cycle)")
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_input_bytes: int = Field(default=16_384, gt=0)
    backpressure: Backpressure = Field(default_factory=Backpressure)
    autoscale: AutoscalePolicy = Field(default_factory=AutoscalePolicy)
    faults: Faults = Field(default_factory=Faults)
    # -- the token-level model (SPEC section 10) --------------------------------------------------
    batching: Batching = Field(default=Batching.STATIC)
    decode_step_ms: float = Field(default=0.0, ge=0, description="fixed time of one step")
    decode_ms_per_seq: float = Field(default=0.0, ge=0, description="step time per sequence in the step")
    prefill_ms_per_token: float = Field(default=0.0, ge=0, description="step time per prompt token prefilled")
    # -- the extended step model (SPEC section 12): terms that carry long contexts and small steps -----
    step_floor_ms: float = Field(
        default=0.0,
        ge=0,
        description="continuous: the time a step cannot go under however little it computes (reading the "
        "weights); joined to the step's linear part as hypot(floor, linear), a smooth roofline",
    )
    prefill_step_ms: float = Field(
        default=0.0, ge=0, description="continuous: extra fixed time of a step that prefills anything"
    )
    decode_ms_per_kv_token: float = Field(
        default=0.0,
        ge=0,
        description="continuous: step time per context token (prompt + generated) its decoding sequences read",
    )
    prefill_ms_per_token_sq: float = Field(
        default=0.0, ge=0, description="continuous: prefill attention, step time per (chunk tokens)^2 of each request"
    )
    prefill_ms_per_context_token: float = Field(
        default=0.0,
        ge=0,
        description="continuous: prefill attention, step time per chunk token x context token before the chunk",
    )
    max_num_seqs: int = Field(default=256, ge=1, le=1_000_000, description="continuous: most running sequences")
    max_batched_tokens: int = Field(
        default=8192, ge=1, description="continuous: most prompt tokens one step prefills (longer prompts chunk)"
    )
    kv_cache_tokens: int | None = Field(
        default=None, ge=1, description="continuous: prompt + output tokens the running sequences may hold; None: any"
    )
    # -- KV blocks and prefix caching (SPEC section 13) --------------------------------------------
    prefix_caching: bool = Field(
        default=False,
        description="continuous: a prompt's leading blocks still resident (another request's, or cached after "
        "one finished) skip their prefill; KV is then counted in blocks of kv_block_tokens, cached blocks "
        "evicted least recently used (core/prefix_cache.py). False: KV counted by tokens, as section 10",
    )
    kv_block_tokens: int = Field(default=16, ge=1, le=4096, description="continuous: tokens in one KV block")
    kv_policy: KvPolicy = Field(
        default=KvPolicy.RESERVE,
        description="continuous: reserve (prompt + output tokens taken at admission) or paged (blocks of "
        "kv_block_tokens taken as a sequence grows; when none is free, the running sequence of the lowest "
        "tier, latest arrival, is preempted and recomputed later, as vLLM does)",
    )
    routing: Routing = Field(
        default=Routing.SHARED_QUEUE,
        description="continuous: shared_queue (one waiting room, the next GPU with room takes the head), or a "
        "request routed to one replica's own queue at arrival: round_robin, least_loaded, prefix_affinity",
    )
    # -- per-request engine overheads outside the steps (SPEC section 12; BLIS's alpha terms) ---------
    request_overhead_ms: float = Field(
        default=0.0,
        ge=0,
        description="continuous: engine time from a request's arrival to its admission "
        "(HTTP, scheduling), fixed part; BLIS alpha0",
    )
    tokenize_ms_per_token: float = Field(
        default=0.0, ge=0, description="continuous: admission delay per prompt token (tokenisation); BLIS alpha1"
    )
    admit_ms_per_request: float = Field(
        default=0.0,
        ge=0,
        description="continuous: host time the engine's loop spends on each request it admits (scheduling; "
        "front-end contention on a shared host), added to the step that admits it",
    )
    output_token_ms: float = Field(
        default=0.0,
        ge=0,
        description="continuous: client-side cost of each streamed token (detokenisation, the "
        "write), cumulative along a stream and outside the engine's steps; BLIS alpha2",
    )
    idle_wake_ms: float = Field(
        default=0.0,
        ge=0,
        description="continuous: extra time of a step that starts an engine idle for idle_after_ms or more "
        "(its host threads and processes asleep: vLLM-CPU about 3 ms, calibrate's wake cells)",
    )
    idle_after_ms: float = Field(
        default=20.0,
        ge=0,
        description="continuous: the idle time after which the next step pays idle_wake_ms (vLLM-CPU: none "
        "after 10 ms, most of it after 30)",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_slos(cls, data: object) -> object:
        """A scenario's flat ``slo_*`` keys and the flags' are the objectives' short names: they land in ``slos``."""
        return nest_slo_aliases(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _context_terms_are_continuous(self) -> ServiceModel:
        if self.prefix_caching and self.batching is not Batching.CONTINUOUS:
            raise ValueError('prefix_caching is a feature of continuous batching: set batching = "continuous"')
        if self.kv_policy is KvPolicy.PAGED and self.batching is not Batching.CONTINUOUS:
            raise ValueError('kv_policy = "paged" is a feature of continuous batching: set batching = "continuous"')
        if self.routing is not Routing.SHARED_QUEUE and self.batching is not Batching.CONTINUOUS:
            raise ValueError('routing is a feature of continuous batching: set batching = "continuous"')
        if self.context_terms and self.batching is not Batching.CONTINUOUS:
            raise ValueError(
                "step_floor_ms, prefill_step_ms, decode_ms_per_kv_token, prefill_ms_per_token_sq and "
                'prefill_ms_per_context_token are terms of continuous batching: set batching = "continuous"'
            )
        return self

    @field_validator("tiers")
    @classmethod
    def _tier_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        for name, share in mix.items():
            Tier.parse(name)
            if share < 0 or not math.isfinite(share):
                raise ValueError(f"tier share for {name} must be >= 0 (got {share})")
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"tier shares must sum to 1 (got {total:g})")
        return {t.label: float(mix.get(t.label, 0.0)) for t in Tier}

    @field_validator("cycle_jitter")
    @classmethod
    def _jitter_quantiles(cls, q: tuple[float, ...]) -> tuple[float, ...]:
        if q and (len(q) < 2 or q[0] <= 0 or any(b < a for a, b in itertools.pairwise(q))):
            raise ValueError("cycle_jitter must be >= 2 positive, non-decreasing quantile multipliers (or empty)")
        return q

    # -- derived quantities: pure functions of the parameters, used everywhere -------------

    @property
    def tokens_modelled(self) -> bool:
        """Whether request lengths change the timing: continuous batching, or any step coefficient."""
        return self.batching is Batching.CONTINUOUS or bool(
            self.decode_step_ms or self.decode_ms_per_seq or self.prefill_ms_per_token
        )

    @property
    def batch_capacity(self) -> int:
        """Requests one GPU holds at once: a full batch, or the running sequences of continuous batching."""
        return self.max_num_seqs if self.batching is Batching.CONTINUOUS else self.max_batch

    @property
    def kv_cache_blocks(self) -> float:
        """KV blocks one GPU holds (prefix caching counts in blocks); infinite without a KV limit."""
        return math.inf if self.kv_cache_tokens is None else self.kv_cache_tokens // self.kv_block_tokens

    @property
    def context_terms(self) -> bool:
        """Whether any term of the extended step model is set (each is 0 by default: section 10 exactly)."""
        return bool(
            self.step_floor_ms
            or self.prefill_step_ms
            or self.decode_ms_per_kv_token
            or self.prefill_ms_per_token_sq
            or self.prefill_ms_per_context_token
        )

    def step_ms(
        self,
        prefill_tokens: int | float,
        sequences: int | float,
        joining: int | float = 0,
        *,
        kv_tokens: int | float = 0,
        prefill_sq: int | float = 0,
        prefill_context: int | float = 0,
    ) -> float:
        """The step formula: one step over ``sequences`` sequences that prefills ``prefill_tokens`` prompt tokens.

        ``joining`` counts the requests the step admits (their first prefill chunk is in it):
        each adds ``admit_ms_per_request`` of host time (continuous batching only).

        The extended model (SPEC section 12) adds what grows with context and what a small
        step cannot save: ``kv_tokens`` is the context (prompt + generated so far) of the
        step's decoding sequences, which decode attention reads; ``prefill_sq`` the sum of
        each prefilling request's chunk squared and ``prefill_context`` the sum of chunk x
        the context before it (causal prefill attention, P_i x (C_i + P_i / 2) when the
        second coefficient is twice the first). The linear part of a step (weights, GEMMs)
        never drops under ``step_floor_ms``: ``hypot(floor, linear)`` is a smooth
        roofline that measured step times (AIConfigurator's, 8B and 70B on H100) follow to
        under 10% where ``max(floor, linear)`` missed by 15%. Every new term at 0 gives the
        three-term formula exactly.
        """
        linear = self.decode_step_ms + self.prefill_ms_per_token * prefill_tokens + self.decode_ms_per_seq * sequences
        if not self.context_terms:
            return linear + self.admit_ms_per_request * joining
        if prefill_tokens:
            linear += self.prefill_step_ms
        return (
            math.hypot(self.step_floor_ms, linear)
            + self.decode_ms_per_kv_token * kv_tokens
            + self.prefill_ms_per_token_sq * prefill_sq
            + self.prefill_ms_per_context_token * prefill_context
            + self.admit_ms_per_request * joining
        )

    @property
    def engine_overheads(self) -> bool:
        """Whether any per-request overhead term is set (each is 0 by default: section 10 exactly)."""
        return bool(self.request_overhead_ms or self.tokenize_ms_per_token or self.output_token_ms)

    def admission_delay_ms(self, prompt_tokens: np.ndarray | float) -> np.ndarray | float:
        """The overhead formula, before the first step: how long after its arrival a request may be admitted.

        The delay runs in parallel for every request (an engine's front end is not a
        queue), so it shifts each request's moment of joining the waiting room; the
        streamed-token cost (``output_token_ms``) then adds one term per token the client
        has seen: token k reaches it ``k x output_token_ms`` after the step that made it.
        """
        return self.request_overhead_ms + self.tokenize_ms_per_token * prompt_tokens

    def wake_ms(self, idle_s: float) -> float:
        """Extra time of a step that starts an engine idle for ``idle_s`` (the step engine, its reference and
        the server's sim backend all add it after the step's spread: it is host time, not the step's work). A
        step that follows the last at once was never idle, whatever ``idle_after_ms`` (0 included) says."""
        return self.idle_wake_ms if idle_s > 0 and idle_s * 1000.0 >= self.idle_after_ms else 0.0

    @property
    def dispatch_rule(self) -> DispatchRule:
        """The parameters of the dispatch decision, in seconds."""
        return DispatchRule(max_batch=self.max_batch, max_wait_s=self.max_wait_ms / 1000.0)

    @property
    def tier_shares(self) -> tuple[float, ...]:
        """Shares in Tier order (enterprise, paid, free)."""
        return tuple(self.tiers[t.label] for t in Tier)

    @property
    def jitter_mean(self) -> float:
        """Mean batch-time multiplier: the mean of the piecewise-linear quantile function."""
        q = self.cycle_jitter
        return sum(a + b for a, b in itertools.pairwise(q)) / (2 * (len(q) - 1)) if q else 1.0

    def jitter(self, u: np.ndarray | float) -> np.ndarray | float:
        """Batch-time multiplier at quantile(s) ``u`` in [0, 1] (inverse-CDF sampling)."""
        q = self.cycle_jitter
        return np.interp(u, np.linspace(0.0, 1.0, len(q)), q) if q else np.ones_like(u, dtype=float)

    def batch_hold_ms(self, batch_size: int) -> float:
        """The cycle formula: how long a batch of ``batch_size`` holds its GPU, before any jitter.

        The simulator's engine, the server's sim backend and the planner's arithmetic all
        take their batch time from here.
        """
        return self.pcie_in_ms + self.kernel_ms + self.pcie_out_ms + self.per_item_ms * batch_size

    def gpu_cycle_ms(self, batch_size: int | None = None, quantile: float | None = None) -> float:
        """GPU time per batch as the planner counts it: the hold, times the jitter, plus assembly without overlap.

        With a measured ``cycle_jitter`` this is the mean hold, or the hold at ``quantile``.
        """
        hold = self.batch_hold_ms(self.max_batch if batch_size is None else batch_size)
        hold *= self.jitter_mean if quantile is None else float(self.jitter(quantile))
        return hold if self.overlap else hold + self.max_wait_ms

    def static_batch_ms(self, batch_size: int, prompt_tokens: int, output_tokens: int, longest: int) -> float:
        """A static batch's whole GPU time with its steps: the hold, one prefill step, decode to the longest.

        ``prompt_tokens`` and ``output_tokens`` are the batch's totals, ``longest`` its
        longest output. Decode step m (m >= 2) holds the sequences still generating, so
        the decode steps sum to (longest - 1) fixed step costs plus one per-sequence cost
        per later token of every sequence. The simulator and the sim backend both time a
        batch with this; with every token coefficient at 0 it is ``batch_hold_ms``.
        """
        decode = (longest - 1) * self.decode_step_ms + self.decode_ms_per_seq * (output_tokens - batch_size)
        return self.batch_hold_ms(batch_size) + self.step_ms(prompt_tokens, batch_size) + decode

    def token_batch_ms(self, batch_size: int, shape: TokenShape) -> float:
        """A full static batch's steps for requests of the mean lengths: prefill all, then decode the longest."""
        p, o = shape.prompt_tokens, shape.output_tokens
        return self.step_ms(batch_size * p, batch_size) + max(o - 1, 0) * self.step_ms(0, batch_size)

    def concurrent_sequences(self, shape: TokenShape) -> float:
        """Sequences one GPU runs at once under continuous batching: max_num_seqs, or fewer if the KV cache binds."""
        seqs = float(self.max_num_seqs)
        if self.kv_cache_tokens is not None:
            seqs = min(seqs, max(1.0, self.kv_cache_tokens // (shape.prompt_tokens + shape.output_tokens)))
        return seqs

    def gpu_ms_per_request(self, shape: TokenShape) -> float:
        """Continuous batching: GPU time one request costs, its prefill plus its share of every decode step.

        Steps vary by the measured spread (``cycle_jitter``), so their mean length counts.
        """
        seqs = self.concurrent_sequences(shape)
        p, o = shape.prompt_tokens, shape.output_tokens
        fill = p - shape.cached_tokens  # a cached prefix is not prefilled, but is read
        decode = o * (self.decode_step_ms / seqs + self.decode_ms_per_seq)
        prefill = self.prefill_ms_per_token * fill + self.admit_ms_per_request
        if self.context_terms:  # a full decode step shared by seqs, each reading its mean context
            decode = o * (
                math.hypot(self.step_floor_ms, self.decode_step_ms + self.decode_ms_per_seq * seqs) / seqs
                + self.decode_ms_per_kv_token * (p + (o + 1) / 2)
            )
            # a prefilling step's extra time is shared by the prompts one step's token budget holds
            shared = min(1.0, fill / self.max_batched_tokens)
            prefill += self.prefill_step_ms * shared + self.prefill_ms_per_token_sq * fill * fill
            prefill += self.prefill_ms_per_context_token * fill * shape.cached_tokens
        return (prefill + decode) * self.jitter_mean

    def per_gpu_rps(self, shape: TokenShape | None = None) -> float:
        """Throughput of one GPU at full occupancy (inf when a request costs no GPU time).

        Static: ``max_batch`` per full cycle, the steps of a batch of mean-length requests
        included when tokens are modelled. Continuous: 1 / :meth:`gpu_ms_per_request`.
        """
        if self.batching is Batching.CONTINUOUS and shape is not None:
            ms = self.gpu_ms_per_request(shape)
            return 1000.0 / ms if ms > 0 else math.inf
        cycle_ms = self.gpu_cycle_ms()
        if shape is not None and self.tokens_modelled:
            cycle_ms += self.token_batch_ms(self.max_batch, shape) * self.jitter_mean
        return self.max_batch / (cycle_ms / 1000.0) if cycle_ms > 0 else math.inf

    def load_factor(self, rps: float, gpus: float, shape: TokenShape | None = None) -> float:
        """Share of the fleet's full-occupancy capacity that ``rps`` uses (the 70% ceiling applies here)."""
        return rps / (self.per_gpu_rps(shape) * gpus) if gpus > 0 else math.inf
