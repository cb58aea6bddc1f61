"""The design's autoscaler in the server: the simulator's rule, acted on through the GPU pool (issue 33).

Every ``tick_s`` the control loop measures the rate offered in the tick just ended
(every request that reached admission, shed ones included), asks
:func:`~infer_plan.core.autoscale.decide_scaling` (the rule the simulator's fleet
runs), and acts through an actuator: *up* provisions a GPU, *down* drains the newest
serving one (it takes nothing new and answers what it runs, :meth:`GpuPool.retire`).

- sim backend (:class:`WorkerActuator`): a GPU is a worker that serves ``cold_start_s``
  after it was ordered;
- ray backend (:class:`ActorActuator`): a GPU is an engine actor and the worker that
  sends to it; it serves once the actor's engine answers (a cluster with Ray's own
  autoscaler adds the node the actor asks for), and the actor is killed once its worker
  is drained;
- openai backend (:class:`HookActuator`): the operator's ``--provision-command`` starts an
  engine replica, which registers itself (``POST /internal/replicas``, at the URL the
  command gets as ``INFER_PLAN_REGISTER_URL``) or prints its base URL as its last line
  for the server to register; ``--release-command`` runs once a released replica is
  drained, with its URL as ``INFER_PLAN_REPLICA_URL``. The cold start is whatever the
  command and the engine take: measure it and set ``cold_start_s`` to it for the plan.

Each decision is one log line and one entry of ``GET /internal/scaling``; ``/readyz``
and ``/metrics`` show the GPUs serving, provisioning and draining.

Under continuous batching the load factor needs the workload's token shape: the mean
prompt and output tokens of the answers of the last tick that had any (the simulator
reads the same means from its workload).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ...core.autoscale import ScaleClock, decide_scaling
from ...core.model import Batching, ServiceModel, TokenShape
from ...core.schema import ScaleAction
from ..api_errors import ApiError
from ..backends.base import Generated
from ..metrics import ServerMetrics
from .gpu_pool import GpuPool
from .replicas import ReplicaSet

__all__ = [
    "ActorActuator",
    "Actuator",
    "HookActuator",
    "LocalLedger",
    "ScaleLedger",
    "ScalingDecision",
    "ServerAutoscaler",
    "WorkerActuator",
]

log = logging.getLogger("infer_plan.server.workers.autoscaler")


@dataclass(frozen=True, slots=True)
class ScalingDecision:
    t_s: float  # since the autoscaler started
    at: float  # time.time(), to line the decisions up with a load test's schedule
    action: ScaleAction
    gpus_serving: int  # after the decision
    gpus_provisioning: int
    offered_rps: float  # the tick's rate that decided it (0 for a cold start's end)

    def to_wire(self) -> dict[str, object]:
        return {"t_s": round(self.t_s, 3), "at": round(self.at, 3), "action": self.action.value,
                "gpus_serving": self.gpus_serving, "gpus_provisioning": self.gpus_provisioning,
                "offered_rps": round(self.offered_rps, 3)}  # fmt: skip


class Actuator(Protocol):
    """How the autoscaler adds and removes GPUs on one backend."""

    async def provision(self) -> bool:
        """Add one GPU; return once it serves (True), or it could not be had (False, logged)."""
        ...

    def release(self) -> asyncio.Future[None] | None:
        """Take the newest serving GPU out of service now; the future resolves once it has left (None: none)."""
        ...


class WorkerActuator:
    """The sim backend: a GPU is a worker of the pool, serving ``cold_start_s`` after it was ordered."""

    def __init__(self, pool: GpuPool, cold_start_s: float) -> None:
        self.pool = pool
        self.cold_start_s = cold_start_s

    async def provision(self) -> bool:
        await asyncio.sleep(self.cold_start_s)
        self.pool.start_worker()
        return True

    def release(self) -> asyncio.Future[None] | None:
        gpu = _newest_worker(self.pool)
        return self.pool.retire(gpu) if gpu is not None else None


def _newest_worker(pool: GpuPool) -> int | None:
    serving = sorted(set(pool.tasks) - pool.retiring)
    return serving[-1] if serving else None


class ActorBackend(Protocol):
    """What the autoscaler needs of the ray backend."""

    async def add_actor(self, gpu: int) -> None: ...

    def remove_actor(self, gpu: int) -> None: ...


class ActorActuator:
    """The ray backend: each GPU is an engine actor and the pool's worker that sends to it."""

    def __init__(self, pool: GpuPool, backend: ActorBackend) -> None:
        self.pool = pool
        self.backend = backend

    async def provision(self) -> bool:
        gpu = self.pool.new_gpu_id()
        try:
            await self.backend.add_actor(gpu)
        except Exception as err:  # Ray's own errors: no room in the cluster, the actor's engine failed to start
            log.error("autoscaler: the Ray actor of GPU %d did not start: %r", gpu, err)
            return False
        self.pool.start_worker(gpu)
        return True

    def release(self) -> asyncio.Future[None] | None:
        gpu = _newest_worker(self.pool)
        return asyncio.ensure_future(self._leave(gpu, self.pool.retire(gpu))) if gpu is not None else None

    async def _leave(self, gpu: int, retired: asyncio.Future[None]) -> None:
        await retired
        self.backend.remove_actor(gpu)


class HookActuator:
    """Engine replicas that the operator's commands start and stop (``--provision-command``, module docstring)."""

    def __init__(self, replicas: ReplicaSet, provision: str, release: str | None, register_url: str, timeout_s: float):
        self.replicas = replicas
        self.provision_command, self.release_command = provision, release
        self.register_url = register_url
        self.timeout_s = timeout_s

    async def provision(self) -> bool:
        known = set(self.replicas.replicas)
        url = ""
        try:
            out = await self._run(self.provision_command, {"INFER_PLAN_REGISTER_URL": self.register_url})
            lines = out.strip().splitlines()
            url = lines[-1].strip().rstrip("/") if lines else ""
            if url.startswith(("http://", "https://")) and url not in self.replicas.replicas:
                await self.replicas.add(url, 1)
            async with asyncio.timeout(self.timeout_s):
                while not set(self.replicas.replicas) - known:  # the replica registers itself
                    await asyncio.sleep(0.1)
        except (OSError, TimeoutError, HookError, ApiError) as err:
            log.error("autoscaler: provisioning failed: %s", err)
            if url.startswith(("http://", "https://")) and url not in self.replicas.replicas:
                await self._release_command(url)  # started but not serving: not left running unseen
            return False
        return True

    def release(self) -> asyncio.Future[None] | None:
        serving = [r for r in self.replicas.replicas.values() if r.state == "serving"]
        if not serving:
            return None
        newest = max(serving, key=lambda r: r.since)
        return asyncio.ensure_future(self._leave(newest.url))

    async def _leave(self, url: str) -> None:
        await self.replicas.remove(url)
        await self._release_command(url)

    async def _release_command(self, url: str) -> None:
        if self.release_command:
            try:
                await self._run(self.release_command, {"INFER_PLAN_REPLICA_URL": url})
            except (OSError, TimeoutError, HookError) as err:
                log.error("autoscaler: the release command failed for %s: %s", url, err)

    async def _run(self, command: str, env: dict[str, str]) -> str:
        """``command`` through the shell with ``env`` added; its stdout (HookError on a non-zero exit)."""
        proc = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **env}
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise HookError(f"{command!r} exited with {proc.returncode}: {tail[0]}")
        return out.decode(errors="replace")


class HookError(Exception):
    pass


class ScaleLedger(Protocol):
    """Where the rule's inputs are counted and its clock kept: this process, or every instance on one Redis."""

    async def start(self, tick: int) -> int:
        """The tick index the rule's seconds count from."""
        ...

    async def tick(self, tick: int, arrived: int, fleet: int) -> tuple[int, int] | None:
        """Count this instance's tick; the service's (arrivals, GPUs) when this instance decides it, else None."""
        ...

    async def clock(self) -> ScaleClock: ...

    async def keep(self, clock: ScaleClock) -> None: ...


class LocalLedger:
    """One server process: its own counts, its own clock, and it always decides."""

    def __init__(self) -> None:
        self._clock = ScaleClock()

    async def start(self, tick: int) -> int:
        return tick

    async def tick(self, tick: int, arrived: int, fleet: int) -> tuple[int, int] | None:
        return arrived, fleet

    async def clock(self) -> ScaleClock:
        return self._clock

    async def keep(self, clock: ScaleClock) -> None:
        self._clock = clock


class ServerAutoscaler:
    def __init__(
        self, pool: GpuPool, model: ServiceModel, metrics: ServerMetrics, actuator: Actuator, ledger: ScaleLedger
    ) -> None:
        self.pool = pool
        self.actuator = actuator
        self.ledger = ledger
        self.model = model
        self.policy = model.autoscale
        self.metrics = metrics
        self.arrived = 0  # requests offered in the current tick
        self.provisioning = 0
        self.draining = 0
        self.decisions: list[ScalingDecision] = []
        self._tokens = [0, 0, 0]  # answers, prompt tokens, output tokens in the current tick
        self._shape: TokenShape | None = None
        self._tasks: set[asyncio.Task] = set()
        self._started = time.monotonic()

    def note_arrival(self) -> None:
        self.arrived += 1

    def note_answer(self, future: asyncio.Future[Generated]) -> None:
        """A queued request's future is done: an answer's tokens count toward the tick's shape."""
        if future.cancelled() or future.exception() is not None:
            return
        output = future.result()
        self._tokens[0] += 1
        self._tokens[1] += output.prompt_tokens
        self._tokens[2] += output.completion_tokens

    def readiness(self) -> dict[str, int]:
        return {"gpus_provisioning": self.provisioning, "gpus_draining": self.draining}

    async def run(self) -> None:
        """The control loop. Ticks fall on wall-clock multiples of ``tick_s`` (a slow tick does not shift the
        next): instances tick together, and a load test whose schedule starts on a multiple sees the ticks the
        simulator has (a tick's phase moves each decision by up to a tick)."""
        try:
            await self._control_loop()
        except Exception:  # a bug of ours must not stop the scaling unseen
            log.exception("autoscaler: the control loop stopped")
            raise

    async def _control_loop(self) -> None:
        tick_s = self.policy.tick_s
        self._started = time.monotonic()
        first = math.floor(time.time() / tick_s)
        anchor = await self.ledger.start(first)
        for k in itertools.count(first + 1):  # tick k ends at k x tick_s, wall clock
            await asyncio.sleep(max(0.0, k * tick_s - time.time()))
            arrived, self.arrived = self.arrived, 0
            shape = self._tick_shape()
            totals = await self.ledger.tick(k, arrived, self.pool.gpus + self.provisioning)
            if totals is None:
                continue  # another instance decides this tick
            rate, fleet = totals[0] / tick_s, totals[1]
            up, down, clock = decide_scaling(
                self.policy, await self.ledger.clock(), (k - anchor) * tick_s, fleet,
                lambda n, rate=rate, shape=shape: self.model.load_factor(rate, n, shape),
            )  # fmt: skip
            await self.ledger.keep(clock)
            if up:
                self.provisioning += 1
                self._record(ScaleAction.ORDERED, rate)
                self._spawn(self._provision())
            if down:
                self._release_one(rate)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _tick_shape(self) -> TokenShape | None:
        if self.model.batching is not Batching.CONTINUOUS:
            return None
        answers, prompt, output = self._tokens
        if answers:
            self._shape = TokenShape(prompt / answers, output / answers)
        self._tokens = [0, 0, 0]
        return self._shape

    async def _provision(self) -> None:
        served = await self.actuator.provision()
        self.provisioning -= 1
        if served:
            self._record(ScaleAction.SERVING, 0.0)
        else:
            self._gauges()  # the next tick decides again, on the fleet it has

    def _release_one(self, rate: float) -> None:
        leaving = self.actuator.release()  # it stops taking work now
        if leaving is None:
            return
        self.draining += 1
        self._spawn(self._drain(leaving))
        self._record(ScaleAction.RELEASED, rate)

    async def _drain(self, retired: asyncio.Future[None]) -> None:
        try:
            await retired
        finally:
            self.draining -= 1
            self._gauges()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, action: ScaleAction, rate: float) -> None:
        decision = ScalingDecision(
            time.monotonic() - self._started, time.time(), action, self.pool.gpus, self.provisioning, rate
        )  # fmt: skip
        self.decisions.append(decision)
        self._gauges()
        log.info(
            "autoscaler: %s at %.1f s (offered %.1f req/s): %d GPU(s) serving, %d provisioning, %d draining",
            action.value, decision.t_s, rate, decision.gpus_serving, self.provisioning, self.draining,
        )  # fmt: skip

    def _gauges(self) -> None:
        self.metrics.gpus_provisioning.set(self.provisioning)
        self.metrics.gpus_draining.set(self.draining)
