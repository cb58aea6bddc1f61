"""Scenario and profile files (TOML) and flag overrides, turned into validated objects.

A scenario file has up to three tables, each optional::

    [service]            # ServiceModel fields; nested [service.tiers], [service.backpressure], ...
    max_batch = 100
    [service.tiers]
    enterprise = 0.1
    paid = 0.3
    free = 0.6

    [load]               # the Workload: a rate schedule or a trace
    rps = 10000
    arrival = "poisson"
    [[load.segments]]
    kind = "spike"
    at_s = 120
    duration_s = 60
    factor = 3

    [run]                # RunSettings
    duration_s = 600
    warmup_s = 60

A calibrated profile (``infer-plan calibrate``) is a file of the same shape whose
``[service]`` table sets the cycle times; it is applied on top of the scenario, and flags
are applied last. Unknown keys anywhere are errors: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..core.errors import ConfigError
from ..core.model import ServiceModel
from ..core.slos import nest_slo_aliases
from .inputs.workload import Workload
from .runner import RunSettings

__all__ = ["Scenario", "describe_validation_error", "load_scenario"]

_TABLES = ("service", "load", "run", "profile")
_M = TypeVar("_M", bound=BaseModel)


class Scenario(BaseModel):
    model: ServiceModel
    load: dict[str, Any]
    run: dict[str, Any]

    def workload(self, **overrides: Any) -> Workload:
        data = {**self.load, **{k: v for k, v in overrides.items() if v is not None}}
        schedule = {"rps": data.pop("rps", 0.0), "segments": data.pop("segments", ())}
        extra = data.pop("extra_segments", ())
        schedule["segments"] = (*schedule["segments"], *extra)
        return _validated(Workload, {"schedule": schedule, **data}, "load")

    def settings(self, **overrides: Any) -> RunSettings:
        return _validated(RunSettings, {**self.run, **{k: v for k, v in overrides.items() if v is not None}}, "run")


def describe_validation_error(err: ValidationError, where: str) -> str:
    """One line naming the field and the problem, e.g. ``service.tiers: tier shares must sum to 1``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}.{loc}: {msg}{more}" if loc else f"{where}: {msg}{more}"


def _validated(cls: type[_M], data: dict[str, Any], where: str) -> _M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table or key '{unknown[0]}' (expected: {', '.join(_TABLES[:3])})")
    for table in _TABLES:
        if table in data and not isinstance(data[table], dict):
            raise ConfigError(f"{path}: '{table}' must be a table")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "tiers":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_scenario(
    scenario: Path | None = None, profile: Path | None = None, service_overrides: dict[str, Any] | None = None
) -> Scenario:
    """Defaults, then the scenario file, then the profile, then flags; validated once at the end."""
    service: dict[str, Any] = {}
    load: dict[str, Any] = {}
    run: dict[str, Any] = {}
    where = "flags"
    if scenario is not None:
        data = _read_toml(scenario)
        service, load, run = nest_slo_aliases(data.get("service", {})), data.get("load", {}), data.get("run", {})
        where = str(scenario)
    if profile is not None:
        service = _merge(service, nest_slo_aliases(_read_toml(profile).get("service", {})))
        where = f"{where} + {profile}" if scenario is not None else str(profile)
    overrides = {k: v for k, v in (service_overrides or {}).items() if v is not None}
    service = _merge(service, nest_slo_aliases(overrides))
    model = _validated(ServiceModel, service, f"{where}: service" if where != "flags" else "service")
    scen = Scenario(model=model, load=load, run=run)
    # Validate the other tables now so a bad file fails before any work starts.
    scen.workload(rps=load.get("rps", 0.0))
    scen.settings()
    return scen
