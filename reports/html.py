"""Self-contained HTML pages with plots (plotly, its JavaScript inlined: no network needed to view)."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .schema import LoadTestResult

__all__ = ["loadtest_html", "write_html"]


def loadtest_html(result: LoadTestResult) -> str:
    tiers = [*result.per_tier, "all"]
    stats = [*result.per_tier.values(), result.overall]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("P95 by tier: measured vs simulated (ms)", "P95 over the run, from scheduled send (ms)"),
    )
    fig.add_trace(go.Bar(name="measured P95", x=tiers, y=[s.measured_ms.get("p95_ms") for s in stats]), 1, 1)
    if result.overall.simulated_ms is not None:
        fig.add_trace(
            go.Bar(name="simulated P95", x=tiers, y=[(s.simulated_ms or {}).get("p95_ms") for s in stats]), 1, 1
        )
    if result.latency_over_time:
        fig.add_trace(
            go.Scatter(
                name="P95 per slice",
                x=result.latency_over_time["t_s"],
                y=result.latency_over_time["p95_ms"],
                mode="lines+markers",
            ),
            1,
            2,
        )
    fig.update_layout(barmode="group", height=460, margin={"t": 60})
    rows = "".join(
        f"<tr><td>{html.escape(g.name)}</td><td class={'pass' if g.passed else 'fail'}>"
        f"{'PASS' if g.passed else 'FAIL'}</td><td>{html.escape(g.detail)}</td></tr>"
        for g in result.gates
    )
    verdict = "PASSED" if result.passed else "FAILED"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>infer-plan loadtest</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 10px}.pass{color:#080}.fail{color:#c00}"
        "</style></head><body>"
        f"<h1>infer-plan loadtest: {verdict}</h1>"
        f"<p>target {html.escape(result.target)} ({html.escape(result.url)}), {result.rps:,.0f} req/s planned, "
        f"{result.achieved_rps:,.0f} sent, {result.requests:,} requests measured.</p>"
        f"<table><tr><th>gate</th><th>result</th><th>detail</th></tr>{rows}</table>"
        + fig.to_html(full_html=False, include_plotlyjs=True)
        + "</body></html>"
    )


def write_html(result: LoadTestResult, path: Path) -> None:
    path.write_text(loadtest_html(result), encoding="utf-8")
