"""Simulating a set of arrivals on a fleet: the entry point of both engines and what they return.

``batching = "static"`` runs the design's batch cycle (:mod:`.batch_engine`);
``"continuous"`` runs step-level continuous batching (:mod:`.step_engine`). Both share
the waiting room (:mod:`.waiting`: tiers, zones) and the fleet (:mod:`.fleet`:
failures, autoscaling, the monitor), and return the same :class:`EngineOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from ..core.model import Batching, ServiceModel, TokenShape
from ..core.records import Outcome, RequestRecords
from ..core.schema import ScaleEvent
from .arrivals import Arrivals
from .batch_engine import BatchEngine
from .fleet import Fleet
from .step_engine import StepEngine
from .tokens import TokenGaps

__all__ = ["EngineOutput", "TokenGaps", "simulate_arrivals"]


@dataclass
class EngineOutput:
    """Raw per-request and per-batch records of one run; summarised by :mod:`.metrics`.

    ``records.finished`` is when each answer reaches its client; a request whose batch
    was on a GPU that failed is FAILED and finished when the failure answered it.
    """

    records: RequestRecords
    batch_start: np.ndarray  # when the GPU was taken (window open without overlap); continuous: each step run
    batch_end: np.ndarray
    batch_size: np.ndarray
    up_changes: np.ndarray  # (time, GPUs up) after each change, first row at t=0
    timeseries: dict[str, np.ndarray] = field(default_factory=dict)
    scale_events: list[ScaleEvent] = field(default_factory=list)
    longest_above_s: float = 0.0
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
    """Run the service model over a fixed set of arrivals on ``gpus`` GPUs.

    ``stream``: requests are streamed, so a request of a static batch is answered at its
    last token instead of when its batch ends (continuous batching answers at the last
    token either way).
    """
    if gpus < 1:
        raise ValueError('"gpus" must be >= 1.')
    if model.batching is Batching.CONTINUOUS and not arrivals.has_tokens:
        raise ValueError("continuous batching needs the requests' prompt and output lengths")
    horizon = horizon_s if horizon_s is not None else max(arrivals.end_s, 1e-3)
    every = sample_every_s if sample_every_s is not None else max(1.0, horizon / 600.0)
    env = simpy.Environment()
    rng = np.random.default_rng(seed + 1_000_003)
    shape = _mean_shape(arrivals)

    def load_factor(rate: float, fleet: float) -> float:
        return model.load_factor(rate, fleet, shape)

    engine: BatchEngine | StepEngine
    if model.batching is Batching.CONTINUOUS:
        assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
        engine = StepEngine(
            env, model, arrivals.times, arrivals.tiers, arrivals.prompt_tokens, arrivals.output_tokens, gpus, rng,
            horizon_s=horizon, sample_every_s=every, load_factor=load_factor,
        )  # fmt: skip
    else:
        lengths = (arrivals.prompt_tokens, arrivals.output_tokens) if arrivals.has_tokens else None
        engine = BatchEngine(
            env, model, arrivals.times, arrivals.tiers, gpus, rng, horizon_s=horizon, sample_every_s=every,
            lengths=lengths, stream=stream, load_factor=load_factor,
        )  # fmt: skip
    process = env.process(engine.run())
    if isinstance(engine, BatchEngine):
        engine.dispatcher = process
    else:
        engine.scheduler = process
    engine.fleet.start()
    env.run(until=process)
    return _output(engine, engine.fleet, arrivals)


def _mean_shape(arrivals: Arrivals) -> TokenShape | None:
    if not arrivals.has_tokens or len(arrivals) == 0:
        return None
    assert arrivals.prompt_tokens is not None and arrivals.output_tokens is not None
    return TokenShape(float(arrivals.prompt_tokens.mean()), float(arrivals.output_tokens.mean()))


def _output(engine: BatchEngine | StepEngine, fleet: Fleet, arrivals: Arrivals) -> EngineOutput:
    waiting = engine.waiting
    outcome = np.where(waiting.admitted, np.int8(Outcome.OK), np.int8(Outcome.REJECTED))
    outcome[engine.failed] = Outcome.FAILED
    if isinstance(engine, StepEngine):
        outcome[engine.refused] = Outcome.CLIENT_ERROR
    finished = engine.completion
    if waiting.queued:  # the run ended with requests no GPU took (the whole fleet down)
        outcome[waiting.admitted & np.isnan(finished)] = Outcome.PENDING
    records = RequestRecords(
        tier=arrivals.tiers,
        scheduled=arrivals.times,
        finished=finished,
        outcome=outcome,
        first_token=engine.first_token,
        prompt_tokens=arrivals.prompt_tokens,
        output_tokens=arrivals.output_tokens,
    )
    itl = engine.token_gaps() if engine.first_token is not None else None
    start, end, size = engine.batches()
    return EngineOutput(
        records=records,
        batch_start=start,
        batch_end=end,
        batch_size=size,
        up_changes=np.asarray(fleet.up_changes, dtype=np.float64),
        timeseries={k: np.asarray(v) for k, v in fleet.samples.items()},
        scale_events=fleet.scale_events,
        longest_above_s=fleet.longest_above_s,
        itl=itl,
    )
