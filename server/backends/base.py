"""The one interface every engine sits behind: a batch of requests in, their outputs out, same order.

Each request of a batch is a :class:`Generate` (its prompt, as text or as token ids, and
how many tokens to generate); each answer a :class:`Generated` (its text and its token
counts, which ``usage`` and the token-level measurements need).

Backends are found by name through the ``infer_plan.backends`` entry points (ours are
listed in ``pyproject.toml``; another package adds its own the same way), so adding an
engine is one module and one line, and neither the CLI nor this file names it. Each
declares its settings as a typed model (``Options``) that :meth:`Backend.create`
validates, so a misspelled or missing option is an error naming it, not a silent
default, and takes from the engine flags ``serve`` and ``calibrate`` share
(:class:`EngineFlags`) the ones it needs (:meth:`Backend.options_from`). A name of the
form ``package.module:ClassName`` imports a user's own backend class instead, so a team
can serve its engine (or a fault-injecting one, as the reliability tests do) without
packaging it. The GPU worker pool
calls :meth:`run_batch` for one batch at a time per GPU; a backend that cannot run
concurrent batches serialises internally.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...core.errors import ConfigError
from ...core.model import ServiceModel

__all__ = [
    "Backend",
    "BackendError",
    "BackendOptions",
    "Generate",
    "Generated",
    "Generation",
    "TokenSink",
    "non_empty",
    "plain_chat_prompt",
    "scatter",
]


class TokenSink(Protocol):
    """Where a streamed request's tokens go as the engine produces them (the client's open stream).

    A backend that can stream calls :meth:`token` for each token of the request in order
    and :meth:`finish` once, right after the last; one that cannot simply returns the
    outputs, and the stream sends each answer whole. ``cancelled`` turns true when the
    client has gone: a backend may stop generating for it (continuous batching frees the
    slot) or keep going and drop the tokens (a static batch runs to its end anyway).
    """

    cancelled: bool

    def token(self, piece: str) -> None: ...

    def finish(self, output: Generated) -> None: ...


@dataclass(slots=True)
class Generate:
    """One request of a batch, as the engine sees it: its prompt and its generation parameters."""

    prompt: str | list[int]  # text, or token ids (a prompt of exactly known length, as calibration sends)
    max_tokens: int | None = None  # None: the backend's default
    ignore_eos: bool = False  # generate exactly max_tokens, whatever the model would say
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    temperature: float | None = None  # None: the backend's default
    seed: int | None = None
    priority: int = 0  # the tier (0 = enterprise): an engine with priority scheduling runs lower values first
    sink: TokenSink | None = field(default=None, repr=False, compare=False)  # not carried to other processes

    @property
    def empty(self) -> bool:
        return not self.prompt

    def to_wire(self) -> dict[str, Any]:
        """As the internal batch API and the shared queue carry it (``input``: text or token ids)."""
        wire: dict[str, Any] = {"input": self.prompt}
        for name in _WIRE_PARAMS:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                wire[name] = list(value) if name == "stop" else value
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Generate:
        params = {name: wire[name] for name in _WIRE_PARAMS if wire.get(name) is not None}
        if "stop" in params:
            params["stop"] = tuple(params["stop"])
        return cls(wire["input"], **params)


_WIRE_PARAMS = ("max_tokens", "ignore_eos", "min_tokens", "stop", "temperature", "seed", "priority")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Generate) if f.name in _WIRE_PARAMS}


@dataclass(slots=True)
class Generated:
    """One request's answer and its token counts."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # or "stop": the model ended it
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache, when it says

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "output": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }
        if self.cached_tokens is not None:
            wire["cached_tokens"] = self.cached_tokens
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Generated:
        """An answer as another server sent it; an older server sends only ``output``."""
        return cls(
            str(wire["output"]),
            int(wire.get("prompt_tokens", 0)),
            int(wire.get("completion_tokens", 0)),
            str(wire.get("finish_reason", "length")),
            None if wire.get("cached_tokens") is None else int(wire["cached_tokens"]),
        )


class BackendError(Exception):
    """The engine failed a batch; every request in it is answered 503."""


class BackendOptions(BaseModel):
    """A backend's own settings; the base has none (the sim backend needs only the service model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class EngineFlags:
    """The engine flags ``serve`` and ``calibrate`` share; each backend reads the ones it needs."""

    model: str | None = None
    upstream: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    max_model_len: int = 512
    torch_model: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # None: the engine's own default (torch float32; vLLM the model's, "auto")
    ray_address: str | None = None
    ray_engine: str = "sim"
    api_key: str | None = None
    gpus: int = 1
    extra: dict[str, str] = field(default_factory=dict)  # --backend-option KEY=VALUE: any field of Options

    @property
    def generation(self) -> Generation:
        return Generation(max_tokens=self.max_tokens, temperature=self.temperature)


ENTRY_POINTS = "infer_plan.backends"


def backend_names() -> list[str]:
    """The backends installed (entry point names), without importing any."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINTS)})


def backend_class(name: str) -> type[Backend]:
    """The backend called ``name``, or the class ``package.module:ClassName`` names."""
    if ":" in name:
        return _import_backend(name)
    found = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == name]
    if not found:
        valid = ", ".join(backend_names())
        raise ConfigError(f"unknown backend {name!r} (valid: {valid}, or package.module:ClassName)", field="backend")
    try:
        sub = found[0].load()
    except ImportError as err:
        raise ConfigError(f"backend {name!r}: cannot import {found[0].value} ({err})", field="backend") from None
    if not (isinstance(sub, type) and issubclass(sub, Backend)):
        raise ConfigError(f"backend {name!r}: {found[0].value} is not a Backend subclass", field="backend")
    if not sub.__dict__.get("name"):
        sub.name = name
    return sub


class Backend(ABC):
    steps_itself: ClassVar[bool] = False  # True: run_continuous runs the step loop (continuous batching)
    has_replicas: ClassVar[bool] = False  # True: each GPU worker sends to an engine replica that may join or leave
    name: ClassVar[str] = ""
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    def __init__(self, model: ServiceModel, options: BackendOptions) -> None:
        self.model = model
        self.options = options

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        """This backend's options from the shared flags (override to read some; raise UsageError for a missing one).

        The base reads none: a backend's own settings come through ``--backend-option KEY=VALUE``.
        """
        return {}

    @classmethod
    def options_for(cls, name: str, flags: EngineFlags) -> dict[str, Any]:
        """Backend ``name``'s options: what it reads from the flags, then each ``--backend-option``."""
        return backend_class(name).options_from(flags) | dict(flags.extra)

    @classmethod
    def create(cls, name: str, model: ServiceModel, options: dict[str, Any] | None = None) -> Backend:
        sub = backend_class(name)
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

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` adds about the engine (e.g. Ray's live actors); ``{"actors_live": 0}`` means not ready."""
        return {}

    def restart_count(self) -> int:
        """Engine processes that died and were restarted so far (``inferplan_engine_restarts_total``)."""
        return 0

    def batch_phases(self, gpu: int) -> dict[str, float] | None:
        """The last batch's PCIe in / kernel / PCIe out times on GPU ``gpu`` (ms), from a backend that times them."""
        return None

    async def engine_limits(self) -> dict[str, tuple[int, str]]:
        """What the engine says of its own limits, as ``{name: (value, where it said it)}`` (after start()).

        Names are the service model's: ``max_num_seqs``, ``max_batched_tokens``,
        ``kv_cache_tokens``, and ``max_model_len``. An engine that says nothing returns
        ``{}``; calibration then takes the flags of the same names.
        """
        return {}

    def render_chat(self, messages: list[dict[str, str]]) -> str | list[int]:
        """A chat as one prompt: the engine's chat template where it has one, else :func:`plain_chat_prompt`."""
        return plain_chat_prompt(messages)

    def cached_blocks(self, gpu: int, request: Generate) -> int | None:
        """Leading blocks of ``request``'s prompt that GPU ``gpu`` holds cached, for ``prefix_affinity`` routing;
        None: the backend cannot say (the pool then counts what it sent there, ``server/workers/prefix_index.py``)."""
        return None

    async def run_continuous(self, gpu: int, feed: Any) -> None:
        """Continuous batching on GPU ``gpu``: admit from ``feed`` (a ``StepFeed``) between steps, answer each
        request as its sequence ends, and return once ``feed.wait()`` says False with nothing running.

        Only for backends with ``steps_itself``; the others get each request as a batch of one
        as soon as a slot is free, and their engine steps (``server/workers/continuous.py``).
        """
        raise NotImplementedError

    @abstractmethod
    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        """Outputs for ``requests``, in the same order; raise BackendError on failure."""


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The documented template for engines without their own: one ``role: content`` line each, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


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


def non_empty(requests: list[Generate]) -> tuple[list[int], list[Generate]]:
    """Positions and requests an engine should see.

    Engines refuse an empty prompt, and one refusal fails the whole batch; an empty
    prompt is answered with an empty output instead, in every engine backend alike.
    """
    keep = [i for i, request in enumerate(requests) if not request.empty]
    return keep, [requests[i] for i in keep]


def scatter(n: int, positions: list[int], outputs: list[Generated]) -> list[Generated]:
    """Outputs back at their requests' positions; empty prompts get an empty answer."""
    if len(outputs) != len(positions):
        raise BackendError(f"engine returned {len(outputs)} outputs for {len(positions)} prompts")
    result = [Generated("", finish_reason="stop") for _ in range(n)]
    for i, output in zip(positions, outputs, strict=True):
        result[i] = output
    return result
