"""GPUs beyond one machine: every GPU worker's batches run in a Ray actor that holds one engine.

The deployment this mirrors puts a gateway in front of Ray, which hosts one model actor
per GPU. Here the gateway stays ours (tiers, zones, queues, the dispatch rule, the GPU
worker pool); GPU worker ``g`` hands its batch to actor ``g`` and awaits the outputs,
in order. The actor holds any registered engine (``sim`` by default, so it runs on any
machine; ``vllm`` where vLLM is installed) and asks Ray for one GPU where the cluster
has GPUs, one CPU otherwise.

- No address: a local Ray starts with the server and stops with it. An address
  (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``): the server joins that cluster, creates
  its actors there and leaves the cluster running when it stops.
- A streamed request's tokens come back as the actor makes them: the batch runs as a
  Ray streaming generator that yields each token, then the outputs.
- The autoscaler adds actors while the server runs (:meth:`RayBackend.add_actor`: the
  new GPU worker serves once its actor answers; a cluster with Ray's own autoscaler adds
  the node it needs) and removes them once their worker is drained
  (:meth:`RayBackend.remove_actor`).
- An actor that dies mid-batch fails that batch (:class:`BackendError`: 503 for its
  requests, as every backend does). Ray restarts it (``max_restarts=-1``); the GPU
  worker waits until it answers again before the next batch. ``/readyz`` counts the
  live actors and ``/metrics`` the restarts.

The actor's module must be importable where it runs: on another machine, install
``infer-plan[ray]`` there too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import uuid
from typing import Any, ClassVar

from pydantic import Field

from ...core.errors import UsageError
from ...core.model import ServiceModel
from .base import Backend, BackendError, BackendOptions, EngineFlags, Generate, Generated

__all__ = ["EngineActor", "RayBackend", "RayOptions"]

log = logging.getLogger(__name__)

_BACK_TIMEOUT_S = 120.0  # how long a GPU worker waits for its restarted actor before failing the next batch too


class RayOptions(BackendOptions):
    ray_address: str | None = Field(default=None, description="None: a local Ray for the server's lifetime")
    ray_engine: str = Field(default="sim", description="the engine inside each actor: any backend name")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="that engine's own options")
    actors: int = Field(default=1, ge=1, description="one per GPU worker")
    namespace: str = "infer-plan"


class _QueueSink:
    """A streamed request inside the actor: its tokens go to the generator that ships them to the gateway."""

    def __init__(self, index: int, queue: asyncio.Queue[tuple[str, int, Any]]) -> None:
        self.index, self.queue = index, queue
        self.cancelled = False

    def token(self, piece: str) -> None:
        self.queue.put_nowait(("token", self.index, piece))

    def finish(self, output: Generated) -> None:
        self.queue.put_nowait(("finish", self.index, output.to_wire()))


class EngineActor:
    """One GPU's engine, in a Ray actor (wrapped with ``ray.remote`` in :meth:`RayBackend.start`)."""

    def __init__(self, model_json: str, engine: str, options: dict[str, Any]) -> None:
        self.backend = Backend.create(engine, ServiceModel.model_validate_json(model_json), options)
        self.started: asyncio.Task[None] | None = None

    async def ready(self) -> int:
        """Start the engine once; the process id tells a restarted actor from the old one."""
        if self.started is None:
            self.started = asyncio.ensure_future(self.backend.start())
        await self.started
        return os.getpid()

    async def run_batch(self, wire: list[dict[str, Any]]) -> list[dict[str, Any]]:
        await self.ready()
        outputs = await self.backend.run_batch([Generate.from_wire(w) for w in wire], 0)
        return [o.to_wire() for o in outputs]

    async def run_batch_streamed(self, wire: list[dict[str, Any]], streamed: list[int]):
        """Yield ``("token", i, piece)`` and ``("finish", i, output)`` as they happen, then ``("outputs", ...)``."""
        await self.ready()
        queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        requests = [Generate.from_wire(w) for w in wire]
        for i in streamed:
            requests[i].sink = _QueueSink(i, queue)
        batch = asyncio.ensure_future(self.backend.run_batch(requests, 0))
        while not (batch.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, batch}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        yield ("outputs", -1, [o.to_wire() for o in batch.result()])


class RayBackend(Backend):
    name: ClassVar[str] = "ray"
    Options = RayOptions

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        if flags.ray_engine == "ray":
            raise UsageError("--ray-engine: the engine inside each actor (sim, vllm, ...), not ray itself")
        inner = Backend.options_for(flags.ray_engine, dataclasses.replace(flags, gpus=1, extra={}))
        return {"ray_address": flags.ray_address, "ray_engine": flags.ray_engine, "engine_options": inner,
                "actors": flags.gpus}  # fmt: skip

    def __init__(self, model: ServiceModel, options: RayOptions) -> None:
        super().__init__(model, options)
        self.opts = options
        self.actors: dict[int, Any] = {}  # GPU worker -> its actor
        self.live: dict[int, bool] = {}
        self.restarts = 0
        self.recovering: dict[int, asyncio.Task[None]] = {}  # GPU -> waiting for Ray to restart its actor
        self._started_ray = False
        self._ray: Any = None
        self._remote: Any = None  # the actor class, wrapped by ray.remote (start)
        self._resources: dict[str, int] = {}  # what each actor asks of the cluster: a GPU, else a CPU
        self._prefix = ""  # this server's actors' names

    @property
    def served_name(self) -> str:
        return f"ray-{self.opts.ray_engine}"

    async def start(self) -> None:
        import ray  # imported here: a server on another backend never pays for it

        self._ray = ray
        # Ray's core installs its own SIGTERM/SIGINT handlers (a stack dump, then death): the server's drain on
        # SIGTERM would never run. Its Python-level handlers are put back after ray.init.
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        if not ray.is_initialized():
            common = {"namespace": self.opts.namespace, "log_to_driver": False, "configure_logging": False}
            if self.opts.ray_address is None:
                # Actors ask for one CPU each where there is no GPU: give the local Ray enough logical CPUs,
                # for as many actors as the autoscaler may add.
                most = self.model.autoscale.max_gpus if self.model.autoscale.enabled else self.opts.actors
                cpus = max(self.opts.actors, most, os.cpu_count() or 1)
                ray.init(
                    num_cpus=cpus, include_dashboard=False, object_store_memory=200 * 2**20,
                    _node_ip_address="127.0.0.1", **common,
                )  # fmt: skip
                self._started_ray = True
            else:
                ray.init(address=self.opts.ray_address, **common)
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        self._resources = {"num_gpus": 1} if has_gpu else {"num_cpus": 1}
        self._remote = ray.remote(EngineActor)
        self._prefix = f"infer-plan-{uuid.uuid4().hex[:8]}"  # this server's own actors, even in a shared cluster
        await asyncio.gather(*(self.add_actor(g) for g in range(self.opts.actors)))
        log.info("ray: %d actors of engine %s ready, %s-gpu-0.. in namespace %s (%s each)", len(self.actors),
                 self.opts.ray_engine, self._prefix, self.opts.namespace, "a GPU" if has_gpu else "a CPU")  # fmt: skip

    async def add_actor(self, gpu: int) -> None:
        """An actor for GPU worker ``gpu``; returns once its engine answers (the GPU's cold start)."""
        actor = self._remote.options(
            name=f"{self._prefix}-gpu-{gpu}", max_restarts=-1, max_task_retries=0, **self._resources
        ).remote(self.model.model_dump_json(), self.opts.ray_engine, self.opts.engine_options)
        await actor.ready.remote()
        self.actors[gpu], self.live[gpu] = actor, True

    def remove_actor(self, gpu: int) -> None:
        """Kill GPU worker ``gpu``'s actor (its worker is drained: it runs nothing)."""
        actor = self.actors.pop(gpu, None)
        self.live.pop(gpu, None)
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def readiness(self) -> dict[str, Any]:
        return {"actors": len(self.actors), "actors_live": sum(self.live.values())}

    def restart_count(self) -> int:
        return self.restarts

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        ray = self._ray
        g = gpu if gpu in self.actors else min(self.actors)  # an internal batch's GPU is any live one
        if g in self.recovering:
            await asyncio.shield(self.recovering[g])
        actor = self.actors[g]
        wire = [r.to_wire() for r in requests]
        streamed = [i for i, r in enumerate(requests) if r.sink is not None]
        try:
            if not streamed:
                answers = await actor.run_batch.remote(wire)
            else:
                answers = await self._streamed(actor, wire, streamed, requests)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            self.live[g] = False
            self.restarts += 1
            self.recovering[g] = asyncio.ensure_future(self._wait_back(g))  # /readyz recovers without traffic
            raise BackendError(f"the Ray actor of GPU {g} died mid-batch ({type(err).__name__})") from None
        except ray.exceptions.RayTaskError as err:
            raise BackendError(f"the engine in the Ray actor of GPU {g} failed: {err.cause!r}") from None
        return [Generated.from_wire(a) for a in answers]

    async def _streamed(
        self, actor: Any, wire: list[dict[str, Any]], streamed: list[int], requests: list[Generate]
    ) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        async for ref in actor.run_batch_streamed.options(num_returns="streaming").remote(wire, streamed):
            kind, i, value = await ref
            sink = requests[i].sink if i >= 0 else None
            if kind == "token" and sink is not None and not sink.cancelled:
                sink.token(value)
            elif kind == "finish" and sink is not None and not sink.cancelled:
                sink.finish(Generated.from_wire(value))
            elif kind == "outputs":
                answers = value
        return answers

    async def _wait_back(self, g: int) -> None:
        """Until Ray has restarted GPU ``g``'s actor and its engine answers again."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _BACK_TIMEOUT_S
        while True:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.actors[g].ready.remote().future()), timeout=5.0)
            except Exception as err:  # still restarting: unavailable, died again, or slow
                if loop.time() > give_up:
                    self.recovering.pop(g, None)  # the next batch tries again
                    raise BackendError(f"the Ray actor of GPU {g} has not come back in {_BACK_TIMEOUT_S:g} s") from err
                await asyncio.sleep(0.2)
                continue
            self.live[g] = True
            self.recovering.pop(g, None)
            log.info("ray: the actor of GPU %d is back", g)
            return

    async def close(self) -> None:
        for task in self.recovering.values():
            task.cancel()
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                log.debug("ray: actor already gone", exc_info=True)
        self.actors = {}
        ray.shutdown()  # stops the local Ray this server started; only disconnects from a cluster it joined
