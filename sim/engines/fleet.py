"""The simulated GPU fleet: failures and repairs, the autoscaler with its cold starts, and the monitor.

Both engines (the batch cycle and continuous batching) keep their GPUs' work to
themselves and leave the fleet's life to this module: a GPU goes down and comes back
(exponential MTBF/MTTR), the autoscaler orders GPUs that serve only after the cold
start and releases idle ones, and a monitor samples the queue, the fleet and the load.
The engine is told of every change (:class:`FleetUser`) so it can fail the work of a
dying GPU and re-plan at once.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

import numpy as np
import simpy

from ...core.autoscale import ScaleClock, decide_scaling
from ...core.model import ServiceModel
from ...core.schema import ScaleAction, ScaleEvent
from .waiting import WaitingQueues

__all__ = ["SAMPLE_KEYS", "Fleet", "FleetUser", "GpuState"]

SAMPLE_KEYS = ("t_s", "queue_depth", "gpus_up", "gpus_provisioning", "offered_rps", "load_factor")


class GpuState(IntEnum):
    UP = 0
    DOWN = 1  # failed, waiting for repair
    COLD = 2  # provisioned, cold-starting
    RETIRED = 3  # scaled down


class FleetUser(Protocol):
    """What the fleet needs of an engine."""

    waiting: WaitingQueues

    def gpu_added(self) -> None:
        """Make room for one more GPU (it starts cold)."""

    def gpu_changed(self, gpu: int, state: GpuState) -> None:
        """GPU ``gpu`` is now ``state``: start using it, or stop; re-plan now."""

    def gpu_failing(self, gpu: int) -> None:
        """GPU ``gpu`` fails now: the requests it runs get their error."""

    def retire_choice(self, up: list[int]) -> int:
        """Which of the serving GPUs to release (an idle one if any)."""


class Fleet:
    def __init__(
        self,
        env: simpy.Environment,
        model: ServiceModel,
        gpus: int,
        rng: np.random.Generator,
        engine: FleetUser,
        *,
        load_factor: Callable[[float, float], float],
        capacity: int,
        horizon_s: float,
        sample_every_s: float,
    ) -> None:
        self.env, self.model, self.rng, self.engine = env, model, rng, engine
        self.load_factor = load_factor  # of an offered rate on a number of GPUs, for the autoscaler and monitor
        self.capacity = capacity  # requests one GPU holds at once: sizes the default zones
        self.horizon_s = horizon_s
        self.sample_every_s = sample_every_s
        self.state: list[GpuState] = [GpuState.UP] * gpus
        self.n_up = gpus
        self.up_changes: list[tuple[float, int]] = [(0.0, gpus)]
        self.scale_events: list[ScaleEvent] = []
        self.longest_above_s = 0.0  # the longest the autoscaler saw its load above the scale-up trigger
        self.samples: dict[str, list[float]] = {k: [] for k in SAMPLE_KEYS}
        engine.waiting.thresholds = model.backpressure.thresholds(gpus, capacity)
        # The rate estimates look back this far; the waiting room keeps those arrivals for them.
        engine.waiting.lookback_s = max(sample_every_s, model.autoscale.tick_s if model.autoscale.enabled else 0.0)

    def start(self) -> None:
        self.env.process(self.monitor())
        if self.model.faults.mtbf_s is not None:
            for gpu in range(len(self.state)):
                self.env.process(self.gpu_faults(gpu))
        if self.model.autoscale.enabled:
            self.env.process(self.autoscaler())

    def set_state(self, gpu: int, state: GpuState) -> None:
        self.state[gpu] = state
        self.n_up = sum(1 for s in self.state if s is GpuState.UP)
        self.engine.waiting.thresholds = self.model.backpressure.thresholds(self.n_up, self.capacity)
        self.up_changes.append((self.env.now, self.n_up))
        self.engine.gpu_changed(gpu, state)

    def gpu_faults(self, gpu: int):  # SimPy process
        faults = self.model.faults
        assert faults.mtbf_s is not None
        env = self.env
        while True:
            yield env.timeout(self.rng.exponential(faults.mtbf_s))
            if self.state[gpu] is not GpuState.UP:
                continue
            self.engine.gpu_failing(gpu)
            self.set_state(gpu, GpuState.DOWN)
            yield env.timeout(self.rng.exponential(faults.mttr_s))
            self.set_state(gpu, GpuState.UP)

    def provision(self):  # SimPy process
        gpu = len(self.state)
        self.state.append(GpuState.COLD)
        self.engine.gpu_added()
        self.log_scaling(ScaleAction.ORDERED)
        yield self.env.timeout(self.model.cold_start_s)
        self.set_state(gpu, GpuState.UP)
        self.log_scaling(ScaleAction.SERVING)
        if self.model.faults.mtbf_s is not None:
            self.env.process(self.gpu_faults(gpu))

    def autoscaler(self):  # SimPy process
        """The rule of :mod:`infer_plan.core.autoscale` every tick, on the tick's offered rate (the server's too)."""
        policy = self.model.autoscale
        env = self.env
        waiting = self.engine.waiting
        clock = ScaleClock()
        while True:
            yield env.timeout(policy.tick_s)
            now = env.now
            rate = waiting.arrivals_between(now - policy.tick_s, now) / policy.tick_s
            fleet = sum(1 for s in self.state if s in (GpuState.UP, GpuState.COLD))
            up, down, clock = decide_scaling(policy, clock, now, fleet, lambda n, r=rate: self.load_factor(r, n))
            self.longest_above_s = clock.longest_above_s
            if up:
                env.process(self.provision())
            if down:
                self.retire_one()

    def retire_one(self) -> None:
        """Release one serving GPU; the work it is running still completes."""
        up = [g for g, s in enumerate(self.state) if s is GpuState.UP]
        if up:
            self.set_state(self.engine.retire_choice(up), GpuState.RETIRED)
            self.log_scaling(ScaleAction.RELEASED)

    def log_scaling(self, action: ScaleAction) -> None:
        cold = sum(1 for s in self.state if s is GpuState.COLD)
        self.scale_events.append(ScaleEvent(t_s=self.env.now, action=action, gpus_up=self.n_up, gpus_cold=cold))

    def monitor(self):  # SimPy process
        env, waiting, samples = self.env, self.engine.waiting, self.samples
        step = self.sample_every_s
        while env.now <= self.horizon_s:
            now = env.now
            waiting.admit_until(now)
            arrived = waiting.arrivals_between(now - step, now)
            up = self.n_up
            samples["t_s"].append(now)
            samples["queue_depth"].append(waiting.queued)
            samples["gpus_up"].append(up)
            samples["gpus_provisioning"].append(sum(1 for s in self.state if s is GpuState.COLD))
            rate = arrived / step if now > 0 else 0.0
            samples["offered_rps"].append(rate)
            samples["load_factor"].append(self.load_factor(rate, up) if up else 0.0)
            yield env.timeout(step)
