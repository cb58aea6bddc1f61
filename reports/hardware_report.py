"""A hardware plan's ranking (every GPU x tensor-parallel option, cheapest first) and its cost-versus-TTFT plot.

Kept apart from :mod:`.tables` because it is read across options, not along one run:
what each costs, how fast it is, what binds it, and which options no other beats on
both cost and TTFT P95 (the frontier).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from ..core.schema import HardwareOption, HardwarePlanResult
from .tables import Summary, Table, Verdict

__all__ = ["hardware_figures", "hardware_summary"]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _cost(o: HardwareOption) -> float | None:
    return o.usd_per_hour if o.usd_per_hour is not None else o.gpus


def _binding(o: HardwareOption) -> str:
    """The constraint's name without the tiers it binds (the plan's own table lists them)."""
    if o.skipped is not None:
        return "does not fit"
    return o.binding_constraint.split(" (")[0] if o.binding_constraint else "-"


def hardware_summary(r: HardwarePlanResult) -> Summary:
    rows = [
        [
            f"{o.tp} x {o.gpu}", str(o.replicas or "-"), str(o.gpus or "-"), _num(o.usd_per_hour, 2),
            _num(o.usd_per_million_output_tokens, 3), _num(o.ttft_p95_ms), _num(o.itl_p95_ms), _num(o.p95_ms, 0),
            _binding(o),
            "yes" if o.pareto else "", _num(100 * o.fit_max_relative_error if o.fit_max_relative_error else None),
        ]
        for o in r.options
    ]  # fmt: skip
    best = r.best
    if best is None:
        headline, verdict = "No option met every SLO within the search limit.", Verdict.FAIL
    else:
        cost = f", ${best.usd_per_hour:,.2f}/hour" if best.usd_per_hour is not None else ""
        headline = f"Cheapest: {best.replicas} replica(s) of {best.tp} x {best.gpu} = {best.gpus} GPU(s){cost}"
        verdict = Verdict.PASS
    skipped = [o.skipped for o in r.options if o.skipped]  # each names its option
    return Summary(
        title="infer-plan capacity (hardware)",
        headline=headline,
        verdict=verdict,
        facts=[
            ("model", f"{r.model} under {r.engine}"),
            ("rate", f"{r.rps:,.6g} req/s, {r.output_tokens_per_request:,.0f} output tokens each"),
            ("prices", r.prices or "none given (--prices FILE): ranked by GPUs"),
            ("ranked by", r.ranked_by),
            ("options", f"{len(r.options)} planned in {r.elapsed_s:,.1f} s on {r.ran_on}"),
        ],
        notes=skipped,
        tables=[
            Table(
                title="Options (a replica is TP GPUs; latencies are the plan's simulated P95s, ms)",
                headers=[
                    "option",
                    "replicas",
                    "GPUs",
                    "$/hour",
                    "$/M out tokens",
                    "TTFT P95",
                    "ITL P95",
                    "E2E P95",
                    "binding",
                    "frontier",
                    "fit err %",
                ],
                rows=rows,
                emphasis={0} if best is not None else set(),
            )
        ],
    )


def hardware_figures(r: HardwarePlanResult) -> list[go.Figure]:
    planned = [o for o in r.options if o.replicas is not None]
    fig = go.Figure()
    for on in (False, True):
        points = [o for o in planned if o.pareto is on]
        fig.add_trace(
            go.Scatter(
                x=[o.ttft_p95_ms for o in points], y=[_cost(o) for o in points], mode="markers+text",
                text=[f"{o.tp}x {o.gpu}" for o in points], textposition="top center",
                name="frontier" if on else "other options", marker={"size": 12 if on else 8},
            )
        )  # fmt: skip
    frontier = sorted((o for o in planned if o.pareto), key=lambda o: o.ttft_p95_ms or 0.0)
    fig.add_trace(
        go.Scatter(
            x=[o.ttft_p95_ms for o in frontier],
            y=[_cost(o) for o in frontier],
            mode="lines",
            name="cost-versus-TTFT frontier",
            line={"dash": "dot"},
        )
    )
    fig.update_layout(
        title="Cost against TTFT P95, every option planned",
        xaxis_title="TTFT P95 (ms)",
        yaxis_title="USD per hour" if r.prices else "GPUs",
    )
    return [fig]
