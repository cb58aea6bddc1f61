"""The one interface every engine sits behind: a batch of inputs in, outputs out, same order.

A backend is registered under a name (``@Backend.register("sim")``) and built with
:meth:`Backend.create`, so adding an engine is one new module. Each declares its
settings as a typed model (``Options``) that :meth:`Backend.create` validates, so a
misspelled or missing option is an error naming it, not a silent default. A name of the form
``package.module:ClassName`` imports a user's own backend class instead, so a team
can serve its engine (or a fault-injecting one, as the reliability tests do) without
forking the server. The GPU worker pool
calls :meth:`run_batch` for one batch at a time per GPU; a backend that cannot run
concurrent batches serialises internally.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...core.errors import ConfigError
from ...core.model import ServiceModel

__all__ = ["Backend", "BackendError", "BackendOptions", "Generation", "non_empty", "scatter"]


class BackendError(Exception):
    """The engine failed a batch; every request in it is answered 503."""


class BackendOptions(BaseModel):
    """A backend's own settings; the base has none (the sim backend needs only the service model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Backend(ABC):
    registry: ClassVar[dict[str, type[Backend]]] = {}
    name: ClassVar[str] = ""
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        self.model = model
        self.options = options

    @classmethod
    def register(cls, name: str):
        def deco(sub: type[Backend]) -> type[Backend]:
            sub.name = name
            cls.registry[name] = sub
            return sub

        return deco

    @classmethod
    def create(cls, name: str, model: ServiceModel, options: dict[str, Any] | None = None) -> Backend:
        _load_builtin_backends()
        sub = _import_backend(name) if ":" in name else cls.registry.get(name)
        if sub is None:
            valid = ", ".join(sorted(cls.registry))
            raise ConfigError(f"unknown backend {name!r} (valid: {valid}, or package.module:ClassName)")
        try:
            typed = sub.Options.model_validate(options or {})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"backend {name!r}: option {where!r}: {first['msg']}") from None
        return sub(model, typed)

    @property
    def served_name(self) -> str:
        """The model name clients send when the operator names none (valid after start())."""
        return self.name or "custom"

    async def start(self) -> None:  # noqa: B027  (optional hook)
        """Load weights, open connections; called once before the first batch."""

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release what start() took."""

    @abstractmethod
    async def run_batch(self, inputs: list[str], gpu: int) -> list[str]:
        """Outputs for ``inputs``, in the same order; raise BackendError on failure."""


def _load_builtin_backends() -> None:
    # Each registers itself; the engine modules import their heavy libraries only in start().
    from . import openai_upstream, remote, sim, vllm_engine  # noqa: F401


def _import_backend(spec: str) -> type[Backend]:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"backend {spec!r}: cannot import {module_name!r} ({err})") from None
    sub = getattr(module, class_name, None)
    if not (isinstance(sub, type) and issubclass(sub, Backend)):
        raise ConfigError(f"backend {spec!r}: {class_name!r} is not a Backend subclass in {module_name}")
    return sub


class Generation(BaseModel):
    """Sampling settings shared by the engine backends (vLLM in-process and OpenAI upstream).

    Greedy by default, so the same input gives the same output and a test can check
    that every client got its own answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=16, ge=1, le=32_768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


def non_empty(inputs: list[str]) -> tuple[list[int], list[str]]:
    """Positions and texts of the inputs an engine should see.

    Engines refuse an empty prompt, and one refusal fails the whole batch; an empty
    input is answered with an empty output instead, in every engine backend alike.
    """
    keep = [i for i, text in enumerate(inputs) if text]
    return keep, [inputs[i] for i in keep]


def scatter(n: int, positions: list[int], outputs: list[str]) -> list[str]:
    """Outputs back at their inputs' positions; empty inputs get ''."""
    if len(outputs) != len(positions):
        raise BackendError(f"engine returned {len(outputs)} outputs for {len(positions)} prompts")
    result = [""] * n
    for i, text in zip(positions, outputs, strict=True):
        result[i] = text
    return result
