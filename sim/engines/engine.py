"""Simulating a set of arrivals on a fleet: the entry point of both engines and what they return.

``batching = "static"`` runs the design's batch cycle (:mod:`.batch_engine`);
``"continuous"`` runs step-level continuous batching (:mod:`.step_engine`). Both share
the waiting room (:mod:`.waiting`: tiers, zones) and the fleet (:mod:`.fleet`:
failures, autoscaling, the monitor). Settled requests go to a sink (:mod:`.sinks`): kept
whole by :func:`simulate_arrivals`, folded into histograms for a summary by the runner.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import simpy

from ...core.model import Batching, ServiceModel, TokenShape
from ...core.records import Outcome, RequestRecords
from ..inputs.arrivals import Arrivals, concatenate, split
from ..results.fleet_log import FleetLog
from ..results.sinks import RecordKeeper, Sink, simulated_outcomes
from ..results.token_gaps import TokenGaps
from .batch_engine import BatchEngine
from .compiled_steps import CompiledSteps, compiled_applies, shares_only_system_prompts
from .step_engine import StepEngine
from .waiting import SessionPlan

__all__ = ["EngineOutput", "FleetLog", "TokenGaps", "simulate_arrivals", "simulate_chunks"]


@dataclass
class EngineOutput:
    """Raw per-request and per-batch records of one exact run (:func:`simulate_arrivals`).

    ``records.finished`` is when each answer reaches its client; a request whose batch
    was on a GPU that failed is FAILED and finished when the failure answered it.
    """

    records: RequestRecords
    batch_start: np.ndarray  # when the GPU was taken (window open without overlap); continuous: each step run
    batch_end: np.ndarray
    batch_size: np.ndarray
    fleet: FleetLog
    itl: TokenGaps | None = None  # with tokens modelled


def simulate_arrivals(
    model: ServiceModel,
    arrivals: Arrivals,
    gpus: int,
    *,
    seed: int = 0,
    horizon_s: float | None = None,
    sample_every_s: float | None = None,
    stream: bool = False,
    compiled: bool | None = None,
    send_until_s: float | None = None,
    plan_rows: bool = False,
) -> EngineOutput:
    """Run the service model over a fixed set of arrivals on ``gpus`` GPUs, keeping every request.

    ``stream``: requests are streamed, so a request of a static batch is answered at its
    last token instead of when its batch ends (continuous batching answers at the last
    token either way). Sessions send every turn unless ``send_until_s`` (default: ``horizon_s``)
    stops them; the records are then in the order the turns were sent, without those never
    sent, or with ``plan_rows`` one per row of ``arrivals`` (a load test's rows: an unsent
    turn's times NaN).
    """
    keeper = RecordKeeper()
    fleet = simulate_chunks(
        model, split(arrivals, 1.0), gpus, keeper, seed=seed, horizon_s=horizon_s if horizon_s is not None else
        max(arrivals.end_s, 1e-3), sample_every_s=sample_every_s, stream=stream, tokens=arrivals.has_tokens,
        shape=_mean_shape(arrivals), compiled=compiled,
        send_until_s=send_until_s if send_until_s is not None else horizon_s if horizon_s is not None else math.inf,
        plan_rows=plan_rows,
    )  # fmt: skip
    start, end, size = keeper.batches()
    return EngineOutput(keeper.records(), start, end, size, fleet, keeper.gaps() if arrivals.has_tokens else None)


def simulate_chunks(
    model: ServiceModel,
    chunks: Iterable[Arrivals],
    gpus: int,
    sink: Sink,
    *,
    seed: int = 0,
    horizon_s: float,
    sample_every_s: float | None = None,
    stream: bool = False,
    tokens: bool,
    shape: TokenShape | None,
    compiled: bool | None = None,
    send_until_s: float | None = None,
    plan_rows: bool = False,
) -> FleetLog:
    """Run the service model over arrivals given a time slice at a time, handing settled requests to ``sink``.

    ``shape`` (the workload's mean lengths) converts an offered rate to a load factor for
    the autoscaler and the monitor. Static batching streams: a run holds about one chunk
    of requests; so does continuous batching's compiled loop (:mod:`.compiled_steps`), while
    the interpreted one (``compiled=False``, or where the compiled one does not apply, as with
    sessions) reads all its arrivals first. A session's later turns are sent until
    ``send_until_s`` (default: the horizon), handed to ``sink`` in the order they were sent
    (``plan_rows``: in the arrivals' rows, every row).
    """
    if gpus < 1:
        raise ValueError('"gpus" must be >= 1.')
    if model.batching is Batching.CONTINUOUS and not tokens:
        raise ValueError("continuous batching needs the requests' prompt and output lengths")
    every = sample_every_s if sample_every_s is not None else max(1.0, horizon_s / 600.0)
    env = simpy.Environment()
    rng = np.random.default_rng(seed + 1_000_003)

    def load_factor(rate: float, fleet: float) -> float:
        return model.load_factor(rate, fleet, shape)

    engine: BatchEngine | StepEngine
    chunks = iter(chunks)
    first = next(chunks, None)
    sessions = first is not None and first.has_sessions  # closed-loop turns: the interpreted engine's
    keyed = first is not None and not shares_only_system_prompts(first.prefixes)  # traces' hash ids
    chunks = itertools.chain([first] if first is not None else [], chunks)
    runs_compiled = compiled_applies(model, prefixes=sessions or keyed) and not sessions
    use_compiled = compiled if compiled is not None else runs_compiled
    if model.batching is Batching.CONTINUOUS and use_compiled:
        if not runs_compiled:
            raise ValueError(
                "the compiled loop runs a fixed fleet with steps of their formula's length, no sessions, and caches "
                "system prompts only"
            )
        steps = CompiledSteps(model, gpus, sink, horizon_s=horizon_s, sample_every_s=every, load_factor=load_factor)
        return steps.run(chunks)
    if model.batching is Batching.CONTINUOUS:
        arrivals = concatenate(chunks)
        assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
        ready, order = admission_order(model, arrivals.times, arrivals.prompt_tokens)
        plan = None
        if sessions:
            until = send_until_s if send_until_s is not None else horizon_s
            plan = session_plan(model, arrivals, order, until)
        engine = StepEngine(
            env, model, ready, arrivals.tiers[order], arrivals.prompt_tokens[order], arrivals.output_tokens[order],
            gpus, rng, horizon_s=horizon_s, sample_every_s=every, load_factor=load_factor, jitter_seed=seed,
            prefixes=None if arrivals.prefixes is None else arrivals.prefixes[order], sessions=plan,
        )  # fmt: skip
    else:
        engine = BatchEngine(
            env, model, chunks, gpus, rng, horizon_s=horizon_s, sample_every_s=every, tokens=tokens, stream=stream,
            load_factor=load_factor, sink=sink,
        )  # fmt: skip
    process = env.process(engine.run())
    if isinstance(engine, BatchEngine):
        engine.dispatcher = process
    else:
        engine.scheduler = process
    engine.fleet.start()
    env.run(until=process)
    if isinstance(engine, BatchEngine):
        engine.finish()
    else:
        _fold_steps(engine, arrivals, order, sink, plan, plan_rows)
    fleet = engine.fleet
    return FleetLog(
        up_changes=np.asarray(fleet.up_changes, dtype=np.float64),
        timeseries={k: np.asarray(v) for k, v in fleet.samples.items()},
        scale_events=fleet.scale_events,
        longest_above_s=fleet.longest_above_s,
    )


def _mean_shape(arrivals: Arrivals) -> TokenShape | None:
    if not arrivals.has_tokens or len(arrivals) == 0:
        return None
    assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
    return TokenShape(float(arrivals.prompt_tokens.mean()), float(arrivals.output_tokens.mean()))


def admission_order(model: ServiceModel, times: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When each request may join the waiting room, sorted, and the arrival index of each in that order.

    Without engine overheads that is the arrivals themselves. With them a request joins
    ``admission_delay_ms`` after it arrives; a short prompt can overtake a long one sent
    just before it, so the order is by joining time (stable: ties keep arrival order).
    """
    if not (model.request_overhead_ms or model.tokenize_ms_per_token):
        return times, np.arange(times.size)
    ready = times + np.asarray(model.admission_delay_ms(prompt.astype(np.float64))) / 1000.0
    order = np.argsort(ready, kind="stable")
    return ready[order], order


def session_plan(model: ServiceModel, arrivals: Arrivals, order: np.ndarray, until_s: float) -> SessionPlan:
    """The sessions of ``arrivals`` (rows) in the engine's order of requests (``order[e]`` is engine index e's row)."""
    assert arrivals.follows is not None and arrivals.think_s is not None and arrivals.prompt_tokens is not None
    n = order.size
    engine_of = np.empty(n, dtype=np.int64)
    engine_of[order] = np.arange(n)
    next_row = np.full(n, -1, dtype=np.int64)
    later = np.flatnonzero(arrivals.follows >= 0)
    next_row[arrivals.follows[later]] = later
    follows_me = np.where(next_row >= 0, engine_of[np.maximum(next_row, 0)], -1)[order]
    delay_s = np.broadcast_to(np.asarray(model.admission_delay_ms(arrivals.prompt_tokens.astype(np.float64))), n)
    return SessionPlan(follows_me.tolist(), arrivals.think_s[order].tolist(), (delay_s[order] / 1000.0).tolist(),
                       arrivals.times[order].tolist(), until_s)  # fmt: skip


def _fold_steps(
    engine: StepEngine,
    arrivals: Arrivals,
    order: np.ndarray,
    sink: Sink,
    plan: SessionPlan | None = None,
    plan_rows: bool = False,
) -> None:
    """Continuous batching's requests, all at the end of its run, back in arrival order.

    The engine ran them in joining order (:func:`admission_order`); each column is put
    back. With sessions a later turn's time is when it was sent; the requests go to the sink
    in that order, without the turns never sent (after the horizon). A streamed token
    reaches its client ``output_token_ms`` later per token it
    has had (the engine's steps do not wait for it), so every gap grows by that much,
    the first token by one term and an answer's end by one per token.
    """
    waiting = engine.waiting

    def by_arrival(column: np.ndarray) -> np.ndarray:
        back = np.empty_like(column)
        back[order] = column
        return back

    finished, first_token = by_arrival(engine.completion), by_arrival(engine.first_token)
    outcome = simulated_outcomes(
        by_arrival(waiting.admitted), by_arrival(engine.failed), finished, final=waiting.queued > 0
    )
    outcome[by_arrival(engine.refused)] = Outcome.CLIENT_ERROR  # longer than the whole KV cache
    gaps = engine.token_gaps()
    if engine.model.output_token_ms:
        assert arrivals.output_tokens is not None
        lag_s = engine.model.output_token_ms / 1000.0
        first_token = first_token + lag_s
        served = outcome == Outcome.OK
        finished[served] += lag_s * arrivals.output_tokens[served]
        gaps = TokenGaps(gaps.gaps_ms + engine.model.output_token_ms, gaps.counts, gaps.at_s)
    sink.fold_batches(*engine.batches())
    sink.fold_gaps(gaps)
    records = RequestRecords(
        tier=arrivals.tiers,
        scheduled=arrivals.times if plan is None else by_arrival(np.asarray(plan.sent)),
        finished=finished,
        outcome=outcome,
        first_token=first_token,
        prompt_tokens=arrivals.prompt_tokens,
        output_tokens=arrivals.output_tokens,
        cached_tokens=by_arrival(engine.cached_tokens) if engine.model.prefix_caching else None,
        preemptions=by_arrival(engine.preemptions) if engine.paged else None,
    )
    if plan is not None:
        sent = np.flatnonzero(np.isfinite(records.scheduled))
        if plan_rows:
            records.outcome[~np.isfinite(records.scheduled)] = Outcome.PENDING  # never sent: no answer either
            sink.fold(records)
            return
        records = records.take(sent[np.argsort(records.scheduled[sent], kind="stable")])
    sink.fold(records)
