"""Simulating a set of arrivals on a fleet: the entry point of both engines and what they return.

``batching = "static"`` runs the design's batch cycle (:mod:`.batch_engine`);
``"continuous"`` runs step-level continuous batching (:mod:`.step_engine`). Both share
the waiting room (:mod:`.waiting`: tiers, zones) and the fleet (:mod:`.fleet`:
failures, autoscaling, the monitor). Settled requests go to a sink (:mod:`.sinks`): kept
whole by :func:`simulate_arrivals`, folded into histograms for a summary by the runner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import simpy

from ..core.model import Batching, ServiceModel, TokenShape
from ..core.records import Outcome, RequestRecords
from ..core.schema import ScaleEvent
from .arrivals import Arrivals, concatenate, split
from .batch_engine import BatchEngine
from .sinks import RecordKeeper, Sink, simulated_outcomes
from .step_engine import StepEngine
from .tokens import TokenGaps

__all__ = ["EngineOutput", "FleetLog", "TokenGaps", "simulate_arrivals", "simulate_chunks"]


@dataclass
class FleetLog:
    """What the fleet did over a run: GPUs up over time, the monitor's samples, the autoscaler's decisions."""

    up_changes: np.ndarray  # (time, GPUs up) after each change, first row at t=0
    timeseries: dict[str, np.ndarray] = field(default_factory=dict)
    scale_events: list[ScaleEvent] = field(default_factory=list)
    longest_above_s: float = 0.0


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
) -> EngineOutput:
    """Run the service model over a fixed set of arrivals on ``gpus`` GPUs, keeping every request.

    ``stream``: requests are streamed, so a request of a static batch is answered at its
    last token instead of when its batch ends (continuous batching answers at the last
    token either way).
    """
    keeper = RecordKeeper()
    fleet = simulate_chunks(
        model, split(arrivals, 1.0), gpus, keeper, seed=seed, horizon_s=horizon_s if horizon_s is not None else
        max(arrivals.end_s, 1e-3), sample_every_s=sample_every_s, stream=stream, tokens=arrivals.has_tokens,
        shape=_mean_shape(arrivals),
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
) -> FleetLog:
    """Run the service model over arrivals given a time slice at a time, handing settled requests to ``sink``.

    ``shape`` (the workload's mean lengths) converts an offered rate to a load factor for
    the autoscaler and the monitor. Static batching streams: a run holds about one chunk
    of requests. Continuous batching reads all its arrivals first.
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
    if model.batching is Batching.CONTINUOUS:
        arrivals = concatenate(chunks)
        assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
        engine = StepEngine(
            env, model, arrivals.times, arrivals.tiers, arrivals.prompt_tokens, arrivals.output_tokens, gpus, rng,
            horizon_s=horizon_s, sample_every_s=every, load_factor=load_factor,
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
        _fold_steps(engine, arrivals, sink)
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


def _fold_steps(engine: StepEngine, arrivals: Arrivals, sink: Sink) -> None:
    """Continuous batching's requests, all at the end of its run."""
    waiting = engine.waiting
    finished = engine.completion
    outcome = simulated_outcomes(waiting.admitted, engine.failed, finished, final=waiting.queued > 0)
    outcome[engine.refused] = Outcome.CLIENT_ERROR  # longer than the whole KV cache
    sink.fold_batches(*engine.batches())
    sink.fold_gaps(engine.token_gaps())
    sink.fold(
        RequestRecords(
            tier=arrivals.tiers,
            scheduled=arrivals.times,
            finished=finished,
            outcome=outcome,
            first_token=engine.first_token,
            prompt_tokens=arrivals.prompt_tokens,
            output_tokens=arrivals.output_tokens,
        )
    )
