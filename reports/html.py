"""Self-contained HTML pages with plots: plotly, its JavaScript inlined once, no network needed to view.

Each result kind gets the figures a person would draw by hand: latency CDFs per tier,
P95 and load against GPU count, the capacity sweep, queue depth / GPUs / load over
time, measured against simulated percentiles, and batch latency against batch size
with the fitted line. The numbers beside the plots come from :mod:`.tables`, the same
content the Markdown rendering shows.
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.errors import UsageError
from ..core.schema import (
    CDF_POINTS,
    AnyResult,
    CalibrationResult,
    CapacityResult,
    LatencyStats,
    LoadTestResult,
    MeasuredVsSimulated,
    SimulationResult,
)
from .hardware_report import hardware_figures
from .sweep_report import sweep_figures
from .tables import Summary, summaries, summarise

__all__ = ["result_html", "write_html"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
    "{text-align:left}.PASS{color:#080}.FAIL{color:#c00;font-weight:bold}.emphasis{font-weight:bold}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{color:#666}dd{margin:0}"
)
_TIER_COLOURS = {"enterprise": "#1f77b4", "paid": "#ff7f0e", "free": "#2ca02c", "all": "#444"}


def _cdf_traces(name: str, cdf_ms: list[float], *, dash: str | None = None, suffix: str = "") -> go.Scatter:
    return go.Scatter(
        x=cdf_ms,
        y=list(CDF_POINTS),
        mode="lines",
        name=f"{name}{suffix}",
        line={"color": _TIER_COLOURS.get(name), "dash": dash},
    )


def _cdf_figure(title: str, xaxis: str = "latency (ms)") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="percentile", height=420)
    return fig


def _simulation_figures(r: SimulationResult) -> list[go.Figure]:
    figures = []
    for title, field, xaxis in (
        ("End-to-end latency CDF per tier (simulated)", "cdf_ms", "latency (ms)"),
        ("Time to first token CDF per tier (simulated)", "ttft_cdf_ms", "TTFT (ms)"),
        ("Inter-token latency CDF per tier, over all gaps (simulated)", "itl_cdf_ms", "ITL (ms)"),
    ):
        cdf = _cdf_figure(title, xaxis)
        for tier, stats in r.per_tier.items():
            if getattr(stats, field):
                cdf.add_trace(_cdf_traces(tier, getattr(stats, field)))
        if cdf.data or field == "cdf_ms":  # token CDFs only where tokens are modelled
            figures.append(cdf)
    ts = r.timeseries
    if ts is not None and ts.t_s:
        tokens = bool(ts.output_tokens_per_s)
        rows = 4 if tokens else 3
        titles = ("queue depth", "GPUs", "load factor and offered rate", "output tokens/s")[:rows]
        over = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles)
        over.add_trace(go.Scatter(x=ts.t_s, y=ts.queue_depth, name="queued requests"), 1, 1)
        over.add_trace(go.Scatter(x=ts.t_s, y=ts.gpus_up, name="GPUs up", line_shape="hv"), 2, 1)
        over.add_trace(go.Scatter(x=ts.t_s, y=ts.gpus_provisioning, name="GPUs cold-starting", line_shape="hv"), 2, 1)
        over.add_trace(go.Scatter(x=ts.t_s, y=ts.load_factor, name="load factor"), 3, 1)
        if tokens:
            over.add_trace(go.Scatter(x=ts.t_s, y=ts.output_tokens_per_s, name="output tokens/s"), 4, 1)
        over.update_xaxes(title_text="time (s)", row=rows, col=1)
        over.update_layout(title="Over time", height=220 * rows)
        figures.append(over)
    return figures


def _capacity_figures(r: CapacityResult) -> list[go.Figure]:
    rows = r.neighbours
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    gpus = [n.gpus for n in rows]
    fig.add_trace(go.Scatter(x=gpus, y=[n.p95_ms for n in rows], name="P95 (ms)", mode="lines+markers"))
    tiers = list(rows[0].per_tier_p95_ms) if rows else []
    for tier in tiers:
        fig.add_trace(
            go.Scatter(
                x=gpus,
                y=[n.per_tier_p95_ms.get(tier) for n in rows],
                name=f"P95 {tier}",
                mode="lines",
                line={"dash": "dot", "color": _TIER_COLOURS.get(tier)},
            )
        )
    fig.add_trace(
        go.Scatter(x=gpus, y=[n.load_factor for n in rows], name="load factor", mode="lines+markers"),
        secondary_y=True,
    )
    fig.add_hline(y=r.constraints.get("e2e_p95_ms", 500.0), line_dash="dash", annotation_text="P95 SLO")
    if r.gpus is not None:
        fig.add_vline(x=r.gpus, line_dash="dot", annotation_text=f"plan: {r.gpus} GPUs")
    fig.update_layout(title=f"P95 and load versus GPU count at {r.rps:,.0f} req/s", height=460)
    fig.update_xaxes(title_text="GPUs")
    fig.update_yaxes(title_text="P95 (ms)", secondary_y=False)
    fig.update_yaxes(title_text="load factor", secondary_y=True)
    figures = [fig]
    if r.sweep:
        sweep = make_subplots(specs=[[{"secondary_y": True}]])
        rps = [p.rps for p in r.sweep]
        sweep.add_trace(go.Scatter(x=rps, y=[p.p95_ms for p in r.sweep], name="P95 at plan (ms)", mode="lines+markers"))
        sweep.add_trace(go.Scatter(x=rps, y=[p.gpus for p in r.sweep], name="GPUs", line_shape="hv"), secondary_y=True)
        sweep.update_layout(title="P95 and GPUs versus rps (sweep)", height=420)
        sweep.update_xaxes(title_text="requests/s")
        sweep.update_yaxes(title_text="P95 (ms)", secondary_y=False)
        sweep.update_yaxes(title_text="GPUs", secondary_y=True)
        figures.append(sweep)
    return figures


def _loadtest_figures(r: LoadTestResult) -> list[go.Figure]:
    names = [*r.per_tier, "all"]
    stats = [*r.per_tier.values(), r.overall]
    bars = go.Figure()
    for q, colour in (("p50_ms", "#1f77b4"), ("p95_ms", "#ff7f0e"), ("p99_ms", "#d62728")):
        label = q.removesuffix("_ms").upper()
        bars.add_trace(
            go.Bar(name=f"measured {label}", x=names, y=[getattr(s.measured_ms, q) for s in stats], marker_color=colour)
        )
        if r.overall.simulated_ms is not None:
            bars.add_trace(
                go.Bar(
                    name=f"simulated {label}",
                    x=names,
                    y=[getattr(s.simulated_ms or LatencyStats(), q) for s in stats],
                    marker={"color": colour, "opacity": 0.55, "pattern": {"shape": "/"}},
                )
            )
    bars.update_layout(title="Measured versus simulated percentiles (ms)", barmode="group", height=440)
    figures = [bars]
    cdf = _cdf_figure("Latency CDF per tier: measured (solid) and simulated (dashed)")
    for name, s in zip(names, stats, strict=True):
        if s.measured_ms.cdf_ms:
            cdf.add_trace(_cdf_traces(name, s.measured_ms.cdf_ms, suffix=" measured"))
        if s.simulated_ms is not None and s.simulated_ms.cdf_ms:
            cdf.add_trace(_cdf_traces(name, s.simulated_ms.cdf_ms, dash="dash", suffix=" simulated"))
    if cdf.data:  # results from schema version 1 carry no CDFs
        figures.append(cdf)
    figures += _token_cdfs(names, stats)
    if r.latency_over_time:
        over = go.Figure()
        for key, label, dash in (
            ("p95_ms", "P95", None), ("ttft_p95_ms", "TTFT P95", None), ("simulated_p95_ms", "P95 simulated", "dash")
        ):  # fmt: skip
            if key in r.latency_over_time:
                x, y = r.latency_over_time["t_s"], r.latency_over_time[key]
                over.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=label, line={"dash": dash}))
        over.update_layout(title="P95 over the run, from scheduled send (ms)", xaxis_title="time (s)", height=380)
        figures.append(over)
    if r.server_metrics is not None and r.server_metrics.t_s:
        m = r.server_metrics
        load = go.Figure()
        for label, series in (("waiting", m.waiting), ("running", m.running)):
            if label in m.names:
                load.add_trace(go.Scatter(x=m.t_s, y=series, mode="lines", name=f"{label} ({m.names[label]})"))
        load.update_layout(title=f"The target's queue over the run ({m.url})", xaxis_title="time (s)", height=380)
        figures.append(load)
    if (fleet := _fleet_figure(r)) is not None:
        figures.append(fleet)
    return figures


def _fleet_figure(r: LoadTestResult) -> go.Figure | None:
    """GPUs over time: what an autoscaling server reported (scraped), beside what the simulated autoscaler did
    (a fleet that did not change has no plot)."""
    m, sim = r.server_metrics, r.simulated_fleet
    if sim is None and not (m is not None and len(set(m.gpus)) > 1):
        return None  # a fixed fleet: nothing to show
    fig = go.Figure()
    if m is not None and m.gpus:
        fig.add_trace(go.Scatter(x=m.t_s, y=m.gpus, mode="lines", name="serving, measured", line={"shape": "hv"}))
        if m.gpus_provisioning:
            fig.add_trace(go.Scatter(x=m.t_s, y=m.gpus_provisioning, mode="lines", name="provisioning, measured",
                                     line={"shape": "hv"}))  # fmt: skip
    if sim is not None:
        for key, label in (("gpus_up", "serving, simulated"), ("gpus_provisioning", "provisioning, simulated")):
            fig.add_trace(go.Scatter(x=sim["t_s"], y=sim[key], mode="lines", name=label,
                                     line={"shape": "hv", "dash": "dash"}))  # fmt: skip
    fig.update_layout(title="GPUs over the run: measured (scraped) and simulated", xaxis_title="time (s)", height=380)
    return fig


def _token_cdfs(names: list[str], stats: list[MeasuredVsSimulated]) -> list[go.Figure]:
    """TTFT and ITL CDFs per tier, measured (solid) and simulated (dashed)."""
    figures = []
    for field, label in (("ttft_cdf_ms", "TTFT"), ("itl_cdf_ms", "ITL")):
        cdf = _cdf_figure(f"{label} CDF per tier: measured (solid) and simulated (dashed)")
        for name, s in zip(names, stats, strict=True):
            if s.tokens is None:
                continue
            if getattr(s.tokens.measured, field):
                cdf.add_trace(_cdf_traces(name, getattr(s.tokens.measured, field), suffix=f" {label} measured"))
            if s.tokens.simulated is not None and getattr(s.tokens.simulated, field):
                points = getattr(s.tokens.simulated, field)
                cdf.add_trace(_cdf_traces(name, points, dash="dash", suffix=f" {label} simulated"))
        if cdf.data:
            figures.append(cdf)
    return figures


def _calibration_figures(r: CalibrationResult) -> list[go.Figure]:
    if r.mode != "static":
        return [_streamed_calibration_figure(r)] if r.stream_cells else []
    if any(p.prompt_tokens is not None for p in r.points):
        return [_token_calibration_figure(r)]
    sizes = [p.batch_size for p in r.points]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=sizes,
            y=[p.median_ms for p in r.points],
            mode="markers",
            name="measured median",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [p.p95_ms - p.median_ms for p in r.points],
                "arrayminus": [p.median_ms - p.min_ms for p in r.points],
            },
        )
    )
    line_x = [0, max(sizes)]
    fig.add_trace(
        go.Scatter(
            x=line_x,
            y=[r.fixed_ms + r.per_item_ms * x for x in line_x],
            mode="lines",
            name=f"fit: {r.fixed_ms:.1f} + {r.per_item_ms:.3f} x n ms",
        )
    )
    fig.update_layout(
        title=f"Batch latency versus batch size ({r.backend}); bars span min to P95",
        xaxis_title="batch size",
        yaxis_title="ms",
        height=440,
    )
    return [fig]


def _token_calibration_figure(r: CalibrationResult) -> go.Figure:
    """Measured against fitted time per cell: on the diagonal where the step formula holds."""
    labels = [f"n={p.batch_size} prompt={p.prompt_tokens} output={p.output_tokens}" for p in r.points]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[p.fitted_ms for p in r.points], y=[p.median_ms for p in r.points], text=labels,
            mode="markers", name="cells (median; bars min to P95)",
            error_y={
                "type": "data", "symmetric": False,
                "array": [p.p95_ms - p.median_ms for p in r.points],
                "arrayminus": [p.median_ms - p.min_ms for p in r.points],
            },
        )
    )  # fmt: skip
    top = max(max(p.p95_ms, p.fitted_ms) for p in r.points)
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="measured = fitted", line={"dash": "dot"}))
    fig.update_layout(
        title=f"Batch time per cell, measured versus fitted ({r.backend}; max error {r.max_relative_error:.1%})",
        xaxis_title="fitted (ms)", yaxis_title="measured (ms)", height=460,
    )  # fmt: skip
    return fig


def _streamed_calibration_figure(r: CalibrationResult) -> go.Figure:
    """Each streamed cell's median against the fitted model: on the diagonal where the model holds."""
    fig = go.Figure()
    for kind in ("lone", "wake", "decode", "mixed", "traffic_ttft", "traffic_decode"):
        cells = [c for c in r.stream_cells if c.kind == kind]
        if cells:
            fig.add_trace(go.Scatter(
                x=[c.fitted_ms for c in cells], y=[c.median_ms for c in cells], mode="markers", name=kind,
                text=[f"{kind}: {c.sequences} sequences, {c.prefill_tokens} prefilled" for c in cells],
                error_y={"type": "data", "symmetric": False, "array": [c.p95_ms - c.median_ms for c in cells],
                         "arrayminus": [0.0] * len(cells)},
            ))  # fmt: skip
    top = max(max(c.p95_ms, c.fitted_ms) for c in r.stream_cells)
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="measured = fitted", line={"dash": "dot"}))
    fig.update_layout(
        title=f"Streamed cells, measured median versus fitted ({r.backend}; max error {r.max_relative_error:.1%})",
        xaxis_title="fitted (ms)", yaxis_title="measured (ms)", height=460,
    )  # fmt: skip
    return fig


_FIGURES = {
    "simulate": _simulation_figures,
    "capacity": _capacity_figures,
    "loadtest": _loadtest_figures,
    "calibrate": _calibration_figures,
    "sweep": sweep_figures,
    "hardware_plan": hardware_figures,
}


def _summary_html(summary: Summary) -> str:
    esc = html.escape
    facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in summary.facts)
    parts = [f"<h1>{esc(summary.title)}</h1>", f"<p class='{summary.verdict.name}'><b>{esc(summary.headline)}</b></p>"]
    parts.append(f"<dl>{facts}</dl>")
    parts += [f"<h3>{esc(b.title)}</h3><pre>{esc(chr(10).join(b.lines))}</pre>" for b in summary.blocks]
    parts += [f"<p>{esc(note)}</p>" for note in summary.notes]
    for table in summary.tables:
        head = "".join(f"<th>{esc(h)}</th>" for h in table.headers)
        body = "".join(
            f"<tr{' class=emphasis' if i in table.emphasis else ''}>"
            + "".join(f"<td class='{esc(c)}'>{esc(c)}</td>" for c in row)
            + "</tr>"
            for i, row in enumerate(table.rows)
        )
        parts.append(f"<h3>{esc(table.title)}</h3><table><tr>{head}</tr>{body}</table>")
    return "".join(parts)


def result_html(result: AnyResult) -> str:
    """One page: the headline and every number, then the figures drawn from them."""
    summary = summarise(result)
    extra = "".join(_summary_html(other) for other in summaries(result)[1:])
    figures = _FIGURES[result.kind](result)
    plots = "".join(
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, fig in enumerate(figures)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(summary.title)}</title>"
        f"<style>{_STYLE}</style></head><body>{_summary_html(summary)}{extra}{plots}</body></html>"
    )


def write_html(result: AnyResult, path: Path) -> None:
    try:
        path.write_text(result_html(result), encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None
