"""A sweep's summary (every rate's figures, the knee and its interval) and its plots against rate.

Kept apart from :mod:`.tables` and :mod:`.html` because a sweep is read along its rate
axis: latency and goodput against offered rate, measured beside simulated, with the
measured and simulated knees marked.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from ..core.schema import CalibrationResult, SweepResult
from .tables import Summary, Table, Verdict

__all__ = ["knee_fit_summary", "sweep_figures", "sweep_summary"]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def _pair(low: float | None, high: float | None) -> str:
    return f"{_num(low, 0)} / {_num(high, 0)}"


def _verdict(failed: list[str]) -> str:
    if not failed:
        return "held"
    more = f" +{len(failed) - 1}" if len(failed) > 1 else ""
    return f"over: {failed[0]}{more}"


def sweep_summary(r: SweepResult) -> Summary:
    steps = sorted(r.steps, key=lambda s: s.rps)
    rows = [
        [
            _num(s.rps, 2), _num(s.duration_s, 0), f"{s.requests:,}", _pair(s.p50_ms, s.p95_ms),
            _num(s.simulated_p95_ms, 0), _pair(s.ttft_p50_ms, s.ttft_p95_ms), _num(s.simulated_ttft_p95_ms, 0),
            _pair(s.itl_p50_ms, s.itl_p95_ms), _num(s.goodput_rps, 2), f"{s.error_rate:.1%}/{s.reject_rate:.1%}",
            _verdict(s.failed), s.decided_by,
        ]
        for s in steps
    ]  # fmt: skip
    knee_row = {i for i, s in enumerate(steps) if s.rps == r.knee_rps}
    facts = [
        ("target", r.url + (f", {r.gpus} GPU(s)" if r.gpus else "")),
        ("knee", _knee(r)),
        ("simulated knee", _num(r.simulated_knee_rps, 2) + " req/s" if r.simulated_knee_rps else "-"),
        (
            "saturation probe",
            f"{_num(r.saturation_rps, 2)} answers/s from {r.probe_requests} requests at once"
            if r.saturation_rps
            else "-",
        ),
        ("held to", ", ".join(f"{k} {v:g}" for k, v in r.slos.items())),
        (
            "steps",
            f"{len(r.steps)} in {r.elapsed_s:,.0f} s; each {r.step_s:g} s (doubled while its P95 is within "
            f"{r.precision:.0%} of a limit), warm-up {r.warmup_s:g} s",
        ),
    ]
    tables = [
        Table(
            "Steps by offered rate (latency P50 / P95 in ms, measured; sim: simulated P95)",
            [
                "req/s",
                "s",
                "requests",
                "E2E",
                "sim",
                "TTFT",
                "sim",
                "ITL",
                "goodput",
                "err/429",
                "verdict",
                "decided",
            ],
            rows,
            emphasis=knee_row,
        )
    ]
    if r.gates:
        tables.append(Table("Gates", ["gate", "result", "detail"],
                            [[g.name, "PASS" if g.passed else "FAIL", g.detail] for g in r.gates]))  # fmt: skip
    return Summary(
        title="infer-plan loadtest --sweep",
        headline=("PASSED: " if r.passed else "FAILED: ") + r.message,
        verdict=Verdict.PASS if r.passed else Verdict.FAIL,
        facts=facts,
        tables=tables,
    )


def _knee(r: SweepResult) -> str:
    if r.knee_rps is None:
        return "none: " + r.message
    high = f"{r.knee_high_rps:,.2f}" if r.knee_high_rps is not None else "not reached"
    return f"{r.knee_rps:,.2f} req/s, in [{r.knee_low_rps:,.2f}, {high})"


def sweep_figures(r: SweepResult) -> list[go.Figure]:
    steps = sorted(r.steps, key=lambda s: s.rps)
    x = [s.rps for s in steps]
    latency = go.Figure()
    for field, label, dash in (
        ("p95_ms", "E2E P95 measured", None),
        ("simulated_p95_ms", "E2E P95 simulated", "dash"),
        ("ttft_p95_ms", "TTFT P95 measured", None),
        ("simulated_ttft_p95_ms", "TTFT P95 simulated", "dash"),
    ):
        y = [getattr(s, field) for s in steps]
        if any(v is not None for v in y):
            latency.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line={"dash": dash}))
    for key, label in (("e2e_p95_ms", "E2E SLO"), ("ttft_p95_ms", "TTFT SLO")):
        if key in r.slos:
            latency.add_hline(y=r.slos[key], line={"dash": "dot", "color": "#c00"}, annotation_text=label)
    _mark_knees(latency, r)
    latency.update_layout(title="Latency against offered rate", xaxis_title="offered rate (req/s)",
                          yaxis_title="ms", height=440)  # fmt: skip
    goodput = go.Figure()
    goodput.add_trace(go.Scatter(x=x, y=[s.completed_rps for s in steps], mode="lines+markers", name="answered OK"))
    if any(s.goodput_rps is not None for s in steps):
        goodput.add_trace(go.Scatter(x=x, y=[s.goodput_rps for s in steps], mode="lines+markers", name="goodput"))
    goodput.add_trace(go.Scatter(x=x, y=x, mode="lines", name="offered", line={"dash": "dot"}))
    _mark_knees(goodput, r)
    goodput.update_layout(title="Answers and goodput against offered rate", xaxis_title="offered rate (req/s)",
                          yaxis_title="req/s", height=400)  # fmt: skip
    return [latency, goodput]


def _mark_knees(fig: go.Figure, r: SweepResult) -> None:
    if r.knee_rps is not None:
        fig.add_vline(x=r.knee_rps, line={"color": "#080"}, annotation_text="knee measured")
    if r.simulated_knee_rps is not None:
        fig.add_vline(x=r.simulated_knee_rps, line={"color": "#080", "dash": "dash"}, annotation_text="simulated")


def knee_fit_summary(r: CalibrationResult) -> Summary:
    """``calibrate --from-sweep``: the factor, and the knees before and after it."""
    fit = r.knee_fit
    assert fit is not None
    return Summary(
        title="infer-plan calibrate --from-sweep",
        headline=f"engine times x {fit.factor:.4f}: simulated knee {_num(fit.simulated_after_rps, 2)} req/s, "
        f"measured {fit.measured_knee_rps:,.2f} ({r.max_relative_error:.1%} apart)",
        verdict=Verdict.PASS if r.max_relative_error <= 0.05 else Verdict.FAIL,
        facts=[
            ("sweep", fit.sweep),
            ("before", f"the profile's simulated knee was {_num(fit.simulated_before_rps, 2)} req/s"),
            (
                "step time",
                f"{r.decode_step_ms:.4f} ms + {r.prefill_ms_per_token:.6f} ms x prefilled tokens + "
                f"{r.decode_ms_per_seq:.5f} ms x sequences",
            ),
            ("search", f"{fit.simulations} simulated knees (each bisected over rates, {_num(fit.factor, 4)} kept)"),
            ("profile written", f"{r.profile_path}: use it with --profile"),
        ],
    )
