"""A slow, obviously-correct model: one SimPy process per request.

This is how one would first write the simulation: each request is a process that
arrives, is admitted or shed, queues in its tier and waits for its batch's completion
event; a batcher process applies the dispatch rule on every arrival and every GPU
release. It is kept for two reasons: tests check the fast batch-level engine against it
request by request, and ``benchmarks/bench_sim.py`` measures the speed-up over it.
It models the overlapped cycle with backpressure; no faults or autoscaling.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import simpy

from ...core.admission import zone_admits
from ...core.model import ServiceModel
from ...core.tiers import Tier
from ..inputs.arrivals import Arrivals

__all__ = ["simulate_reference"]


def simulate_reference(model: ServiceModel, arrivals: Arrivals, gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (admitted, completion time) per request, like the fast engine's arrays."""
    if not model.overlap:
        raise ValueError("the reference model covers the overlapped cycle only")
    env = simpy.Environment()
    n = len(arrivals)
    admitted = np.ones(n, dtype=bool)
    completion = np.full(n, np.nan)
    queues: list[deque[tuple[float, int, simpy.Event]]] = [deque() for _ in Tier]
    thresholds = model.backpressure.thresholds(gpus, model.max_batch)
    max_wait = model.max_wait_ms / 1000.0
    state = {"free": gpus, "signal": env.event()}

    def notify() -> None:
        if not state["signal"].triggered:
            state["signal"].succeed()

    def request(i: int, tier: int):
        depth = sum(len(q) for q in queues)
        if not zone_admits(tier, depth, thresholds):
            admitted[i] = False
            return
        done = env.event()
        queues[tier].append((env.now, i, done))
        notify()
        yield done
        completion[i] = env.now + model.shared_queue_ms / 1000.0

    def source():
        for i in range(n):
            delay = arrivals.times[i] - env.now
            if delay > 0:
                yield env.timeout(delay)
            env.process(request(i, int(arrivals.tiers[i])))

    def gpu_run(batch: list[simpy.Event]):
        cycle = model.gpu_cycle_ms(len(batch)) / 1000.0
        yield env.timeout(cycle)
        for done in batch:
            done.succeed()
        state["free"] += 1
        notify()

    def batcher():
        while True:
            queued = sum(len(q) for q in queues)
            wait_for = None
            if queued and state["free"] > 0:
                oldest = min(q[0][0] for q in queues if q)
                if queued >= model.max_batch or env.now + 1e-9 >= oldest + max_wait:
                    batch = []
                    for q in queues:
                        while q and len(batch) < model.max_batch:
                            batch.append(q.popleft()[2])
                    state["free"] -= 1
                    env.process(gpu_run(batch))
                    continue
                wait_for = env.timeout(oldest + max_wait - env.now)
            signal = state["signal"] = env.event()
            yield signal if wait_for is None else (signal | wait_for)

    env.process(source())
    env.process(batcher())
    env.run()
    return admitted, completion
