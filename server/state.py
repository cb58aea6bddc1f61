"""The state one server process shares between its handlers and background tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .backends.base import Backend
from .batcher import Batcher
from .config import ServerConfig
from .keys import KeyStore
from .metrics import ServerMetrics

__all__ = ["ServerState"]


@dataclass
class ServerState:
    config: ServerConfig
    keys: KeyStore
    backend: Backend
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    batcher: Batcher | None = None  # made inside the running loop by the app's cleanup context
    ready: bool = False
    draining: bool = False

    @property
    def model_name(self) -> str:
        """The name clients must send: the configured one, else what the backend serves."""
        return self.config.model_name or self.backend.served_name

    async def run_direct(self, inputs: list[str]) -> list[str]:
        assert self.batcher is not None
        return await self.batcher.run_now(inputs)
