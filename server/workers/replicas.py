"""Engine replicas that join and leave a running server (SPEC section 13; the seed design's model servers register).

With ``--backend openai`` each GPU worker stands for one engine replica (an upstream
OpenAI-compatible server). The replicas named by ``--upstream`` are registered at start;
more register on the internal port while the server runs, and any of them leaves:

- ``POST /internal/replicas {"url": ..., "workers": 1}``: the replica is probed first
  (``GET {url}/v1/models`` must answer 200), then its workers start and the queue's zones
  grow with them;
- ``DELETE /internal/replicas?url=...``: its workers take nothing new, finish what they
  run (every accepted request is answered), and end; the call returns once they have;
- every ``check_s`` each replica is probed the same way. One that fails
  ``UNHEALTHY_AFTER`` probes in a row is drained and listed ``unhealthy`` (what it ran
  when it failed gets the backend's 503); when it answers again its workers start again.

``/readyz`` lists the replicas (url, state, GPU workers); ``/metrics`` counts them by
state (``inferplan_replicas``). The pool is shared (each worker takes the next waiting
request when its replica has room), so load spreads by each replica's own pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..api_errors import ApiError
from ..metrics import ServerMetrics
from .gpu_pool import GpuPool

__all__ = ["UNHEALTHY_AFTER", "Replica", "ReplicaBackend", "ReplicaSet"]

log = logging.getLogger("infer_plan.server.workers.replicas")

UNHEALTHY_AFTER = 3  # failed probes in a row: one lost packet or a slow answer does not drain a replica
State = Literal["serving", "unhealthy", "draining"]


class ReplicaBackend(Protocol):
    """What the registry needs of a backend with engine replicas (the openai backend)."""

    replicas: list[str]  # the replicas named at start

    def assign(self, gpu: int, url: str) -> None: ...

    def release(self, gpu: int) -> None: ...

    async def probe(self, url: str) -> str | None:
        """None when ``url`` answers as an engine; else why not, in a few words."""
        ...


@dataclass
class Replica:
    url: str
    workers: int
    state: State = "serving"
    gpus: list[int] = field(default_factory=list)
    failed_probes: int = 0
    since: float = field(default_factory=time.time)  # when it entered its state

    def to_wire(self) -> dict[str, object]:
        return {"url": self.url, "state": self.state, "gpus": list(self.gpus), "since": round(self.since, 3)}


class ReplicaSet:
    def __init__(self, pool: GpuPool, backend: ReplicaBackend, metrics: ServerMetrics, *, check_s: float) -> None:
        self.pool = pool
        self.backend = backend
        self.metrics = metrics
        self.check_s = check_s
        self.replicas: dict[str, Replica] = {}
        self._checker: asyncio.Task | None = None
        self._changing: set[str] = set()  # replicas being added or removed: the checker leaves them alone

    def start(self, gpus: int) -> None:
        """The ``--upstream`` replicas, ``gpus`` workers spread over them in turn (not probed: the first batch says)."""
        named = self.backend.replicas
        for g in range(gpus):
            url = named[g % len(named)]
            replica = self.replicas.setdefault(url, Replica(url, workers=0))
            replica.workers += 1
            replica.gpus.append(self._start_worker(url))
        self._count()
        self._checker = asyncio.create_task(self._check_loop(), name="replica-checks")

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker

    def listing(self) -> list[dict[str, object]]:
        return [r.to_wire() for r in self.replicas.values()]

    async def add(self, url: str, workers: int) -> Replica:
        """Register a replica: probed, then ``workers`` GPU workers send to it (409 if known, 422 if it fails)."""
        if url in self.replicas or url in self._changing:
            raise ApiError(409, f"replica {url} is already registered", code="replica_exists")
        self._changing.add(url)
        try:
            if (why := await self.backend.probe(url)) is not None:
                raise ApiError(422, f"replica {url} did not answer as an engine: {why}", code="replica_unreachable")
            replica = Replica(url, workers, gpus=[self._start_worker(url) for _ in range(workers)])
            self.replicas[url] = replica
        finally:
            self._changing.discard(url)
        log.info("replica %s registered: GPU workers %s", url, replica.gpus)
        self._count()
        return replica

    async def remove(self, url: str) -> Replica:
        """Deregister a replica: its workers drain (nothing accepted is lost), then it is forgotten (404 if unknown)."""
        replica = self.replicas.get(url)
        if replica is None or url in self._changing:
            raise ApiError(404, f"no replica {url} is registered", code="replica_unknown")
        self._changing.add(url)
        try:
            self._enter(replica, "draining")
            await self._drain(replica)
            del self.replicas[url]
        finally:
            self._changing.discard(url)
        log.info("replica %s left", url)
        self._count()
        return replica

    def _start_worker(self, url: str) -> int:
        gpu = self.pool.new_gpu_id()
        self.backend.assign(gpu, url)  # before the worker's first batch asks where to send
        return self.pool.start_worker(gpu)

    async def _drain(self, replica: Replica) -> None:
        await asyncio.gather(*(self.pool.retire(g) for g in replica.gpus))
        for g in replica.gpus:
            self.backend.release(g)
        replica.gpus = []

    def _enter(self, replica: Replica, state: State) -> None:
        replica.state, replica.since = state, time.time()
        self._count()

    def _count(self) -> None:
        for state in ("serving", "unhealthy", "draining"):
            self.metrics.replicas.labels(state).set(sum(r.state == state for r in self.replicas.values()))

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            for replica in [r for r in self.replicas.values() if r.url not in self._changing]:
                await self._check(replica)

    async def _check(self, replica: Replica) -> None:
        why = await self.backend.probe(replica.url)
        if replica.url in self._changing or replica.state == "draining":
            return  # it began to leave while the probe ran
        if why is None:
            replica.failed_probes = 0
            if replica.state == "unhealthy":
                replica.gpus = [self._start_worker(replica.url) for _ in range(replica.workers)]
                self._enter(replica, "serving")
                log.info("replica %s answers again: GPU workers %s", replica.url, replica.gpus)
            return
        replica.failed_probes += 1
        if replica.state == "serving" and replica.failed_probes >= UNHEALTHY_AFTER:
            log.warning("replica %s failed %d probes (%s): drained", replica.url, replica.failed_probes, why)
            self._enter(replica, "unhealthy")
            self._changing.add(replica.url)
            try:
                await self._drain(replica)
            finally:
                self._changing.discard(replica.url)
