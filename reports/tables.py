"""Each result kind as a headline, key facts and plain tables: what Markdown and HTML both show.

Terminal output keeps its own rich layout; these tables are the format-free content, so
the Markdown comment in a pull request and the HTML page cannot disagree on a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import AnyResult, BatchLogCheck, CalibrationResult, CapacityResult, LoadTestResult, SimulationResult

__all__ = ["Summary", "Table", "batch_log_summary", "summarise"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Summary:
    title: str
    headline: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def summarise(result: AnyResult) -> Summary:
    builders = {
        "simulate": _simulation,
        "capacity": _capacity,
        "loadtest": _loadtest,
        "calibrate": _calibration,
    }
    return builders[result.kind](result)


def _simulation(r: SimulationResult) -> Summary:
    rows = [
        [t, f"{s.requests:,}", _ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _pct(s.rejected_fraction)]
        for t, s in r.per_tier.items()
    ]
    rows.append(["all", f"{r.requests:,}", _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.p99_ms), _pct(r.rejected_fraction)])
    return Summary(
        title="infer-plan simulate",
        headline=f"{r.gpus} GPUs at {r.offered_rps:,.0f} req/s offered: P95 {_ms(r.p95_ms)} ms",
        facts=[
            ("throughput", f"{r.throughput_rps:,.0f} req/s"),
            ("load_factor", f"{r.load_factor:.2f}"),
            ("gpu_busy", f"{r.gpu_busy:.2f}"),
            ("mean batch", f"{r.mean_batch_size:.1f} over {r.batches:,} batches"),
            ("window", f"{r.duration_s:g} s after {r.warmup_s:g} s warm-up, seed {r.seed}, {r.replications} run(s)"),
        ],
        tables=[
            Table("Latency, arrival to response (ms)", ["tier", "requests", "P50", "P95", "P99", "rejected"], rows)
        ],
    )


def _capacity(r: CapacityResult) -> Summary:
    headline = (
        f"No GPU count up to {r.search_limit} meets every constraint at {r.rps:,.0f} req/s"
        if r.gpus is None
        else f"{r.gpus} GPUs for {r.rps:,.0f} req/s: P95 {_ms(r.p95_ms)} ms, load_factor {r.load_factor:.2f}"
    )
    neighbours = [
        [
            str(n.gpus),
            _ms(n.p95_ms),
            f"{n.load_factor:.2f}",
            f"{n.gpu_busy:.2f}",
            _pct(n.rejected_fraction),
            "yes" if n.meets else "no: " + ", ".join(n.failed),
        ]
        for n in r.neighbours
    ]
    tables = [
        Table(
            "Neighbouring GPU counts (simulated)",
            ["GPUs", "P95 ms", "load", "gpu_busy", "rejected", "meets"],
            neighbours,
        )
    ]
    if r.sweep:
        tables.append(
            Table(
                "GPUs versus rps",
                ["rps", "GPUs", "raw GPUs", "at ceiling", "P95 ms"],
                [
                    [f"{p.rps:,.0f}", str(p.gpus or "-"), f"{p.raw_gpus:.2f}", str(p.gpus_at_ceiling), _ms(p.p95_ms)]
                    for p in r.sweep
                ],
            )
        )
    return Summary(
        title="infer-plan capacity",
        headline=headline,
        facts=[
            ("binding constraint", r.binding_constraint),
            ("back-of-envelope", "; ".join(r.back_of_envelope.arithmetic)),
            ("constraints", ", ".join(f"{k} {v:g}" for k, v in r.constraints.items())),
        ],
        tables=tables,
    )


def _loadtest(r: LoadTestResult) -> Summary:
    keys = ("p50_ms", "p95_ms", "p99_ms")
    rows = []
    for name, s in [*r.per_tier.items(), ("all", r.overall)]:
        sim, err = s.simulated_ms or {}, s.relative_error or {}
        rows.append(
            [name]
            + [_ms(s.measured_ms.get(k)) for k in keys]
            + [_ms(sim.get(k)) for k in keys]
            + [_pct(err.get(k)) for k in keys]
        )
    gates = [[g.name, "PASS" if g.passed else "FAIL", g.detail] for g in r.gates]
    return Summary(
        title="infer-plan loadtest",
        headline=f"{'PASSED' if r.passed else 'FAILED'}: {r.requests:,} requests at {r.rps:,.0f} req/s "
        f"against {r.target}",
        facts=[
            (
                "sent",
                f"{r.achieved_rps:,.0f} req/s (shortfall {r.shortfall:.1%}, send lag P95 {r.send_lag_p95_ms:.1f} ms)",
            ),
            ("statuses", ", ".join(f"{k}: {v:,}" for k, v in r.status_counts.items())),
            ("errors / rejects", f"{r.error_rate:.3%} / {r.reject_rate:.3%}; wrong outputs {r.wrong_outputs}"),
            *([("batch-log check", batch_log_summary(r.batch_log_check))] if r.batch_log_check else []),
        ],
        tables=[
            Table(
                "Latency from scheduled send (ms): measured vs simulated",
                ["tier", "P50", "P95", "P99", "sim P50", "sim P95", "sim P99", "err P50", "err P95", "err P99"],
                rows,
            ),
            Table("Gates", ["gate", "result", "detail"], gates),
        ],
    )


def _calibration(r: CalibrationResult) -> Summary:
    rows = [[str(p.batch_size), _ms(p.median_ms), _ms(p.p95_ms), _ms(p.min_ms), _ms(p.fitted_ms)] for p in r.points]
    return Summary(
        title="infer-plan calibrate",
        headline=f"batch latency = {r.fixed_ms:.2f} ms + {r.per_item_ms:.4f} ms x batch size ({r.backend})",
        facts=[
            ("fit error", f"max {r.max_relative_error:.1%}, mean {r.mean_relative_error:.1%}"),
            ("measurements", f"{r.repetitions} per size after {r.warmup} warm-up batches"),
            (
                "spread",
                "batch time x " + " .. ".join(f"{q:.2f}" for q in r.cycle_jitter[:: max(1, len(r.cycle_jitter) // 4)]),
            ),
            ("profile", r.profile_path or "-"),
        ],
        tables=[Table("Batch latency by batch size (ms)", ["batch size", "median", "P95", "min", "fitted"], rows)],
    )


def batch_log_summary(c: BatchLogCheck) -> str:
    """One line: the simulation re-run with the batch times the server logged during the load test."""
    sim, err = c.overall.simulated_ms or {}, c.overall.relative_error or {}
    return (
        f"simulated with a fit of {c.batches:,} batches the server logged during the run "
        f"({c.fixed_ms:.1f} ms + {c.per_item_ms:.2f} ms/item, sizes {c.sizes[0]}-{c.sizes[-1]}): "
        f"P50 {_ms(sim.get('p50_ms'))} ms, P95 {_ms(sim.get('p95_ms'))} ms (P95 error {_pct(err.get('p95_ms'))})"
    )
