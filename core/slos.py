"""The service's objectives, held in one object and checked by one function.

A plan (``capacity``: which GPU count meets them), a load test (its CI gates) and a
sweep (the highest rate that meets them) ask the same question of different figures:
does this P95 stay within its SLO, are errors and 429s rare enough, is goodput high
enough? :class:`Slos` holds each objective once; :func:`check_slos` answers for any
result that can say its figures per scope (:class:`Observed`), as a list of typed
:class:`~.schema.Gate`; :func:`good_requests` is the one goodput rule (a request is
good when its own TTFT, TPOT and E2E are each within the thresholds set, as DistServe
and ``vllm bench serve`` define it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schema import Gate, LatencyStats, TokenStats
from .stats import own_tpot_ms
from .tiers import Tier

__all__ = ["SLO_ALIASES", "Observed", "Scope", "Slos", "check_slos", "good_requests", "nest_slo_aliases"]


class Slos(BaseModel):
    """Every objective, once. None: not set (no gate, no constraint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    e2e_p95_ms: float = Field(default=500.0, gt=0, description="end-to-end P95, arrival to response")
    tier_e2e_p95_ms: dict[str, float] = Field(
        default_factory=dict, description="per-tier E2E P95 where it differs from e2e_p95_ms"
    )
    hold_tiers: bool = Field(default=True, description="hold every tier with answers to its objectives, not only all")
    ttft_p95_ms: float | None = Field(default=None, gt=0, description="time to first token, P95")
    itl_p95_ms: float | None = Field(default=None, gt=0, description="inter-token latency, P95 over all gaps")
    tpot_p95_ms: float | None = Field(default=None, gt=0, description="time per output token, P95")
    max_error_rate: float = Field(default=0.001, ge=0, le=1, description="most failed answers (5xx, timeouts)")
    max_reject_rate: float = Field(
        default=0.001, ge=0, le=1, description="most 429s (shed by the zones); the design's 99.9% availability"
    )
    min_goodput_rps: float | None = Field(default=None, ge=0, description="least requests/s meeting every SLO set")

    @field_validator("tier_e2e_p95_ms")
    @classmethod
    def _tiers_known(cls, by_tier: dict[str, float]) -> dict[str, float]:
        for name, limit in by_tier.items():
            Tier.parse(name)  # a misspelled tier is an error, not an objective that never applies
            if not limit > 0:
                raise ValueError(f"{name}: a P95 objective must be > 0 ms, got {limit!r}")
        return by_tier

    @property
    def limits(self) -> dict[str, float]:
        """The numeric objectives set, by field name: what a plan's result records it was held to."""
        return {k: float(v) for k, v in self.model_dump(exclude_none=True).items() if type(v) in (int, float)}

    def e2e_for(self, scope: str) -> float:
        return self.tier_e2e_p95_ms.get(scope, self.e2e_p95_ms)

    @property
    def token_p95s(self) -> dict[str, float]:
        """The token percentile objectives set: TokenStats field -> limit."""
        named = {"ttft_p95_ms": self.ttft_p95_ms, "itl_p95_ms": self.itl_p95_ms, "tpot_p95_ms": self.tpot_p95_ms}
        return {key: limit for key, limit in named.items() if limit is not None}


# Where the service model's flat scenario keys and flags land (each objective still named once, in Slos).
SLO_ALIASES = {
    "slo_p95_ms": "e2e_p95_ms",
    "slo_ttft_p95_ms": "ttft_p95_ms",
    "slo_itl_p95_ms": "itl_p95_ms",
    "slo_tpot_p95_ms": "tpot_p95_ms",
}


def nest_slo_aliases(service: dict[str, Any]) -> dict[str, Any]:
    """A service table with its flat ``slo_*`` keys moved into ``slos`` (over the table's own, as they come later)."""
    if not SLO_ALIASES.keys() & service.keys():
        return service
    rest = {k: v for k, v in service.items() if k not in SLO_ALIASES}
    nested = rest.get("slos", {})
    nested = nested.model_dump(exclude_unset=True) if isinstance(nested, Slos) else dict(nested)
    rest["slos"] = nested | {SLO_ALIASES[k]: v for k, v in service.items() if k in SLO_ALIASES}
    return rest


def good_requests(
    slos: Slos, e2e_ms: np.ndarray, ttft_ms: np.ndarray | None = None, output_tokens: np.ndarray | None = None
) -> np.ndarray:
    """Which requests count toward goodput: each within every per-request threshold set (TTFT and TPOT need a
    first token; without one, E2E alone)."""
    good = e2e_ms <= slos.e2e_p95_ms
    if ttft_ms is not None:
        if slos.ttft_p95_ms is not None:
            good &= ttft_ms <= slos.ttft_p95_ms
        if slos.tpot_p95_ms is not None and output_tokens is not None:
            good &= own_tpot_ms(e2e_ms, ttft_ms, output_tokens) <= slos.tpot_p95_ms
    return good


@dataclass(frozen=True)
class Scope:
    """One scope's figures: ``overall`` or a tier's."""

    name: str
    latency: LatencyStats
    tokens: TokenStats | None
    requests: int  # answered requests: a tier without any is not held to its objectives


@dataclass(frozen=True)
class Observed:
    """What a result can say to :func:`check_slos`: its scopes (overall first) and its rates."""

    scopes: Sequence[Scope]
    error_rate: float
    reject_rate: float
    no_tokens_why: str = "no request of this scope answered with tokens"
    wrong_outputs: int | None = None  # answers that were not the request's own (a load test checks them)


def check_slos(slos: Slos, seen: Observed) -> list[Gate]:
    """A gate per objective set and scope, in a fixed order: E2E P95, token P95s, errors, 429s, goodput.

    A figure the run could not measure fails its gate and says why, rather than passing unseen.
    """
    overall = seen.scopes[0]
    held = [overall, *(s for s in seen.scopes[1:] if s.requests > 0 and slos.hold_tiers)]
    gates = []
    for scope in held:
        limit, value = slos.e2e_for(scope.name), scope.latency.p95_ms
        gates.append(Gate(name=f"p95_{scope.name}", passed=value is not None and value <= limit, value=value,
                          limit=limit, detail=f"P95 {_ms(value)} ms vs SLO {limit:g} ms"))  # fmt: skip
    for key, limit in slos.token_p95s.items():
        label = key.removesuffix("_p95_ms").upper()
        for scope in held:
            value = getattr(scope.tokens, key) if scope.tokens is not None else None
            why = "" if value is not None else f" (not measured: {seen.no_tokens_why})"
            gates.append(Gate(name=f"{key.removesuffix('_ms')}_{scope.name}", passed=value is not None
                              and value <= limit, value=value, limit=limit,
                              detail=f"{label} P95 {_ms(value)} ms vs SLO {limit:g} ms{why}"))  # fmt: skip
    wrong = f", {seen.wrong_outputs} wrong outputs" if seen.wrong_outputs is not None else ""
    gates.append(Gate(name="error_rate", passed=seen.error_rate <= slos.max_error_rate and not seen.wrong_outputs,
                      value=seen.error_rate, limit=slos.max_error_rate,
                      detail=f"{seen.error_rate:.3%} errors (limit {slos.max_error_rate:.3%}){wrong}"))  # fmt: skip
    gates.append(Gate(name="reject_rate", passed=seen.reject_rate <= slos.max_reject_rate, value=seen.reject_rate,
                      limit=slos.max_reject_rate,
                      detail=f"{seen.reject_rate:.3%} answered 429 (limit {slos.max_reject_rate:.3%})"))  # fmt: skip
    if slos.min_goodput_rps is not None:
        value = overall.tokens.goodput_rps if overall.tokens is not None else None
        gates.append(Gate(name="goodput", passed=value is not None and value >= slos.min_goodput_rps, value=value,
                          limit=slos.min_goodput_rps,
                          detail=f"goodput {'-' if value is None else f'{value:,.1f}'} req/s meeting every SLO set "
                          f"(at least {slos.min_goodput_rps:g} req/s)"))  # fmt: skip
    return gates


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
