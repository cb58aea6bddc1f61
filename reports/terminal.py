"""Rich terminal renderings of results: what a person reads first."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .schema import AnyResult, CalibrationResult, CapacityResult, LoadTestResult, SimulationResult
from .tables import batch_log_summary

__all__ = ["fmt_ms", "render", "render_calibration", "render_capacity", "render_loadtest", "render_simulation"]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _latency_table(result: SimulationResult) -> Table:
    table = Table(title="Latency, arrival to response (ms)", title_justify="left")
    for col in ("tier", "requests", "P50", "P95", "P99", "max", "rejected", "errors"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for tier, stats in result.per_tier.items():
        table.add_row(
            tier,
            f"{stats.requests:,}",
            fmt_ms(stats.p50_ms),
            fmt_ms(stats.p95_ms),
            fmt_ms(stats.p99_ms),
            fmt_ms(stats.max_ms),
            _pct(stats.rejected_fraction),
            _pct(stats.error_fraction),
        )
    table.add_row(
        "all",
        f"{result.requests:,}",
        fmt_ms(result.p50_ms),
        fmt_ms(result.p95_ms),
        fmt_ms(result.p99_ms),
        fmt_ms(result.max_ms),
        _pct(result.rejected_fraction),
        _pct(result.error_fraction),
        style="bold",
    )
    return table


def render_simulation(result: SimulationResult, console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("GPUs", str(result.gpus))
    head.add_row("offered", f"{result.offered_rps:,.0f} req/s (base {result.rps:,.0f})")
    head.add_row("throughput", f"{result.throughput_rps:,.0f} req/s")
    head.add_row("load_factor", f"{result.load_factor:.2f}  (offered / full-batch capacity)")
    head.add_row("gpu_busy", f"{result.gpu_busy:.2f}  (share of GPU time running batches)")
    head.add_row("mean batch", f"{result.mean_batch_size:.1f} over {result.batches:,} batches")
    head.add_row(
        "window",
        f"{result.duration_s:g} s measured after {result.warmup_s:g} s warm-up, seed {result.seed}"
        + ("" if result.overlap else ", no overlap"),
    )
    parts: list[Table | Text] = [head, _latency_table(result)]
    if result.intervals:
        ci = Table(title=f"Across {result.replications} replications (95%)", title_justify="left")
        for col in ("metric", "mean", "confidence interval of the mean", "prediction interval, one run"):
            ci.add_column(col, justify="left" if col == "metric" else "right")
        for key, iv in result.intervals.items():
            ci.add_row(
                key,
                f"{iv.mean:,.3f}",
                f"{iv.ci95_low:,.3f} .. {iv.ci95_high:,.3f}",
                f"{iv.pi95_low:,.3f} .. {iv.pi95_high:,.3f}",
            )
        parts.append(ci)
    console.print(Panel(Group(*parts), title="infer-plan simulate", expand=False))


def render_capacity(result: CapacityResult, console: Console) -> None:
    env = result.back_of_envelope
    if result.gpus is None:
        answer = Text(
            f"No GPU count up to {result.search_limit} meets every constraint at {result.rps:,.0f} req/s",
            style="bold red",
        )
    else:
        answer = Text.assemble(
            (f"{result.gpus} GPUs", "bold green"),
            f" for {result.rps:,.0f} req/s: P95 {fmt_ms(result.p95_ms)} ms (SLO {result.constraints['slo_p95_ms']:g}),"
            f" load_factor {result.load_factor:.2f} (ceiling {result.constraints['max_load']:g}),"
            f" gpu_busy {result.gpu_busy:.2f}",
        )
    arithmetic = Text("\n".join(env.arithmetic))
    table = Table(title="Neighbouring GPU counts (simulated)", title_justify="left")
    tiers = list(result.neighbours[0].per_tier_p95_ms) if result.neighbours else []
    for col in ("GPUs", "P95", *[f"P95 {t}" for t in tiers], "load", "gpu_busy", "rejected", "meets"):
        table.add_column(col, justify="right")
    for row in result.neighbours:
        verdict = "yes" if row.meets else "no: " + ", ".join(row.failed)
        table.add_row(
            str(row.gpus),
            fmt_ms(row.p95_ms),
            *[fmt_ms(row.per_tier_p95_ms.get(t)) for t in tiers],
            f"{row.load_factor:.2f}",
            f"{row.gpu_busy:.2f}",
            _pct(row.rejected_fraction),
            verdict,
            style="bold" if row.gpus == result.gpus else None,
        )
    parts = [
        answer,
        Text(""),
        Panel(arithmetic, title="back-of-envelope", expand=False),
        Text("\n".join(result.explanation)),
        table,
    ]
    if result.sweep:
        sweep = Table(title="GPUs versus rps", title_justify="left")
        for col in ("rps", "GPUs (simulated)", "raw GPUs", "at ceiling", "P95"):
            sweep.add_column(col, justify="right")
        for p in result.sweep:
            sweep.add_row(
                f"{p.rps:,.0f}",
                str(p.gpus if p.gpus is not None else "-"),
                f"{p.raw_gpus:.2f}",
                str(p.gpus_at_ceiling),
                fmt_ms(p.p95_ms),
            )
        parts.append(sweep)
    console.print(Panel(Group(*parts), title="infer-plan capacity", expand=False))


def render_loadtest(result: LoadTestResult, console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("target", f"{result.target} ({result.url})" + (f", {result.gpus} GPU(s)" if result.gpus else ""))
    head.add_row(
        "load",
        f"{result.rps:,.0f} req/s planned, {result.achieved_rps:,.0f} sent "
        f"(shortfall {result.shortfall:.1%}, send lag P95 {result.send_lag_p95_ms:.1f} ms), "
        f"{result.workers or 1} Locust process(es)",
    )
    head.add_row(
        "requests",
        f"{result.requests:,} after {result.warmup_s:g} s warm-up; "
        + ", ".join(f"{k}: {v:,}" for k, v in result.status_counts.items()),
    )
    if result.batch_log_check is not None:
        head.add_row("batch-log check", batch_log_summary(result.batch_log_check))
    table = Table(title="Latency from scheduled send (ms): measured vs simulated", title_justify="left")
    for col in ("tier", "P50", "P95", "P99", "sim P50", "sim P95", "sim P99", "err P50", "err P95", "err P99"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for name, stats in [*result.per_tier.items(), ("all", result.overall)]:
        m, s, e = stats.measured_ms, stats.simulated_ms or {}, stats.relative_error or {}
        keys = ("p50_ms", "p95_ms", "p99_ms")
        table.add_row(
            name,
            *[fmt_ms(m.get(k)) for k in keys],
            *[fmt_ms(s.get(k)) for k in keys],
            *[_pct(e.get(k)) for k in keys],
            style="bold" if name == "all" else None,
        )
    gates = Table(title="Gates", title_justify="left")
    for col in ("gate", "result", "detail"):
        gates.add_column(col)
    for gate in result.gates:
        gates.add_row(
            gate.name, Text("PASS", style="green") if gate.passed else Text("FAIL", style="bold red"), gate.detail
        )
    verdict = Text("PASSED" if result.passed else "FAILED", style="bold green" if result.passed else "bold red")
    console.print(Panel(Group(head, table, gates, verdict), title="infer-plan loadtest", expand=False))


def render_calibration(result: CalibrationResult, console: Console) -> None:
    table = Table(title=f"Batch latency of backend {result.backend!r} (ms)", title_justify="left")
    for col in ("batch size", "median", "P95", "min", "fitted", "fit error"):
        table.add_column(col, justify="right")
    for p in result.points:
        table.add_row(
            str(p.batch_size),
            fmt_ms(p.median_ms),
            fmt_ms(p.p95_ms),
            fmt_ms(p.min_ms),
            fmt_ms(p.fitted_ms),
            _pct(abs(p.fitted_ms - p.median_ms) / p.median_ms if p.median_ms else None),
        )
    console.print(table)
    console.print(
        f"fitted: batch latency = {result.fixed_ms:.3f} ms + {result.per_item_ms:.4f} ms x batch size "
        f"(max error {result.max_relative_error:.1%}, mean {result.mean_relative_error:.1%}; "
        f"{result.repetitions} repetitions per size after {result.warmup} warm-up batches)"
    )
    if result.profile_path:
        console.print(f"profile written to {result.profile_path}: use it with --profile")


def render(result: AnyResult, console: Console) -> None:
    """Any saved result, by kind (``infer-plan report``)."""
    renderers = {
        "simulate": render_simulation,
        "capacity": render_capacity,
        "loadtest": render_loadtest,
        "calibrate": render_calibration,
    }
    renderers[result.kind](result, console)
