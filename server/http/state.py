"""The state one server process shares between its handlers and background tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..access.key_limiter import KeyLimiter
from ..access.keys import KeyStore
from ..backends.base import Backend
from ..config import ServerConfig
from ..metrics import ServerMetrics
from ..queues.queue import TierQueue
from ..workers.autoscaler import ServerAutoscaler
from ..workers.gpu_pool import GpuPool
from ..workers.replicas import ReplicaSet
from .access_log import AccessLog

__all__ = ["ServerState"]


@dataclass
class ServerState:
    config: ServerConfig
    keys: KeyStore
    backend: Backend
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    access_log: AccessLog | None = None
    queue: TierQueue | None = None  # both made inside the running loop by the app's cleanup context
    pool: GpuPool | None = None
    autoscaler: ServerAutoscaler | None = None  # [service.autoscale] enabled
    internal_url: str = ""  # where the internal API listens, once bound (engine replicas register there)
    replicas: ReplicaSet | None = None  # a backend with engine replicas (openai): those that joined and left
    limiter: KeyLimiter | None = None
    ready: bool = False
    draining: bool = False

    @property
    def model_name(self) -> str:
        """The name clients must send: the configured one, else what the backend serves."""
        return self.config.model_name or self.backend.served_name
