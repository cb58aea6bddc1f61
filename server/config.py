"""Everything one server process needs, gathered by the CLI and passed in explicitly."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.model import Batching, ServiceModel

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    model: ServiceModel = field(default_factory=ServiceModel)
    host: str = "127.0.0.1"
    port: int = 8000
    internal_host: str = "127.0.0.1"
    internal_port: int | None = None  # None: port + 1; 0: any free port
    allow_remote_internal: bool = False
    backend: str = "sim"
    backend_options: dict[str, Any] = field(default_factory=dict)
    gpus: int = 1
    keys_file: Path | None = None
    allow_dev_keys: bool = False  # accept the public development keys on a non-loopback address
    model_name: str | None = None  # what clients send as "model"; None: the backend's own name
    drain_timeout_s: float = 30.0
    access_log: bool = True
    redis_url: str | None = None  # set: the tier queues are shared in Redis with other instances
    redis_prefix: str = "infer-plan"  # key prefix: one deployment's keys, so several can share a Redis
    reuse_port: bool = False  # SO_REUSEPORT: sibling processes of `--instances N` share the ports
    replica_check_s: float = 5.0  # how often each engine replica is probed (a backend with replicas)
    provision_command: str | None = None  # the autoscaler's way to start an engine replica (openai backend)
    release_command: str | None = None  # run once a released replica is drained
    provision_timeout_s: float = 600.0  # a command, and the replica's registration, each get this long

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise UsageError("a server needs at least one GPU worker", field="gpus")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError(f"must be a redis://, rediss:// or unix:// URL, not {self.redis_url!r}", field="redis_url")
        if not self.allow_remote_internal and not _is_loopback(self.internal_host):
            raise UsageError(
                f"the internal listener must bind a loopback address, not {self.internal_host!r} "
                "(allow_remote_internal overrides)",
                field="internal_host",
            )
        if self.keys_file is None and not self.allow_dev_keys and not _is_loopback(self.host):
            raise UsageError(
                f"without a keys file the server accepts the public development keys, so it listens on a loopback "
                f"address only, not {self.host!r}: pass a TOML [keys] table (README, 'Keys and limits'), "
                "or --allow-dev-keys to serve them anyway",
                field="keys_file",
            )
        if self.redis_url is not None and self.model.batching is Batching.CONTINUOUS:
            raise UsageError(
                "continuous batching runs on the in-process queue only (the shared Redis queue hands out whole "
                "batches): drop --redis or use batching = static",
                field="redis_url",
            )
        if self.model.autoscale.enabled and self.backend == "openai" and not self.provision_command:
            raise UsageError(
                "autoscaling engine replicas needs --provision-command (it starts one; docs/serving.md, "
                "'Autoscaling while serving')",
                field="provision_command",
            )
        if self.model.autoscale.enabled and self.backend not in ("sim", "openai", "ray"):
            raise UsageError(
                f"the server's autoscaler adds sim GPU workers, Ray actors and engine replicas (--backend openai); "
                f"the {self.backend} backend cannot add engines while it serves: drop [service.autoscale]",
                field="autoscale",
            )
        if not self.model.overlap:
            raise UsageError(
                "the server always overlaps batch assembly with GPU work; overlap = false models the design's "
                "back-of-envelope cycle for planning only: drop it to serve",
                field="overlap",
            )

    @property
    def dev_keys_exposed(self) -> bool:
        """The development keys are accepted on an address others can reach (``--allow-dev-keys``)."""
        return self.keys_file is None and not _is_loopback(self.host)

    @property
    def resolved_internal_port(self) -> int:
        return self.port + 1 if self.internal_port is None and self.port else (self.internal_port or 0)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
