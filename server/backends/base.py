"""The one interface every engine sits behind: a batch of inputs in, outputs out, same order.

A backend is registered under a name (``@Backend.register("sim")``) and built with
:meth:`Backend.create`, so adding an engine is one new module. The GPU worker pool
calls :meth:`run_batch` for one batch at a time per GPU; a backend that cannot run
concurrent batches serialises internally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ...sim.errors import ConfigError

__all__ = ["Backend", "BackendError"]


class BackendError(Exception):
    """The engine failed a batch; every request in it is answered 503."""


class Backend(ABC):
    registry: ClassVar[dict[str, type[Backend]]] = {}
    name: ClassVar[str] = ""

    @classmethod
    def register(cls, name: str):
        def deco(sub: type[Backend]) -> type[Backend]:
            sub.name = name
            cls.registry[name] = sub
            return sub

        return deco

    @classmethod
    def create(cls, name: str, **options: Any) -> Backend:
        _load_builtin_backends()
        try:
            sub = cls.registry[name]
        except KeyError:
            valid = ", ".join(sorted(cls.registry))
            raise ConfigError(f"unknown backend {name!r} (valid: {valid})") from None
        return sub(**options)

    async def start(self) -> None:  # noqa: B027  (optional hook)
        """Load weights, open connections; called once before the first batch."""

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release what start() took."""

    @abstractmethod
    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        """Outputs for ``inputs``, in the same order; raise BackendError on failure."""


def _load_builtin_backends() -> None:
    from . import sim  # noqa: F401  (registers itself)

    for optional in ("openai", "vllm"):
        try:
            __import__(f"{__package__}.{optional}")
        except ImportError:
            continue
