"""Each result kind as a headline, key facts, text blocks and plain tables: what every rendering shows.

The terminal (rich), Markdown and HTML renderers only lay this content out, so a pull
request comment, the HTML page and the terminal cannot disagree on a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from ..core.schema import (
    AnyResult,
    AutoscaleLog,
    BatchLogCheck,
    CalibrationResult,
    CapacityResult,
    LatencyStats,
    LoadTestResult,
    PrecisionReport,
    ScaleAction,
    SimulationResult,
    TokenStats,
)

__all__ = ["Block", "Summary", "Table", "Verdict", "batch_log_summary", "summaries", "summarise"]

BURST_NOTE_SHARE = 0.2  # token gaps read at once (LoadTestResult.burst_gap_share) from which the report says so


def _ms(value: float | None) -> str:
    """One decimal with thousands separators, "-" for none (ms, and rates beside them); never "nan"."""
    return "-" if value is None or not math.isfinite(value) else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _span(low: float, high: float) -> str:
    return f"{low:,.3f} .. {high:,.3f}"


class Verdict(Enum):
    """How the headline reads: a pass, a failure, or plain information."""

    PASS = "pass"
    FAIL = "fail"
    INFO = "info"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    emphasis: set[int] = field(default_factory=set)  # rows shown bold: the plan, the "all" row


@dataclass
class Block:
    """Preformatted lines under a title (the back-of-envelope arithmetic)."""

    title: str
    lines: list[str]


@dataclass
class Summary:
    title: str
    headline: str
    verdict: Verdict = Verdict.INFO
    facts: list[tuple[str, str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def summaries(result: AnyResult) -> list[Summary]:
    """The result's summary, then one per plan made beside it (``capacity --batching static,continuous``)."""
    alternatives = result.alternatives if isinstance(result, CapacityResult) else []
    return [summarise(result), *[summarise(alternative) for alternative in alternatives]]


def summarise(result: AnyResult) -> Summary:
    builders = {
        "simulate": _simulation,
        "capacity": _capacity,
        "loadtest": _loadtest,
        "calibrate": _calibration,
        "sweep": _sweep,
        "hardware_plan": _hardware_plan,
    }
    return builders[result.kind](result)


def _sweep(r: AnyResult) -> Summary:
    from .sweep_report import sweep_summary  # it imports this module's layout types

    return sweep_summary(r)  # type: ignore[arg-type]


def _hardware_plan(r: AnyResult) -> Summary:
    from .hardware_report import hardware_summary  # it imports this module's layout types

    return hardware_summary(r)  # type: ignore[arg-type]


def _latency_row(name: str, requests: int, s: LatencyStats, rejected: float, errors: float) -> list[str]:
    cells = [_ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _ms(s.max_ms)]
    return [name, f"{requests:,}", *cells, _pct(rejected), _pct(errors)]


def _simulation(r: SimulationResult) -> Summary:
    rows = [_latency_row(t, s.requests, s, s.rejected_fraction, s.error_fraction) for t, s in r.per_tier.items()]
    rows.append(_latency_row("all", r.requests, r, r.rejected_fraction, r.error_fraction))
    tables = [
        Table(
            "Latency, arrival to response (ms)",
            ["tier", "requests", "P50", "P95", "P99", "max", "rejected", "errors"],
            rows,
            emphasis={len(rows) - 1},
        )
    ]
    if r.intervals:
        tables.append(
            Table(
                f"Across {r.replications} replications (95%)",
                ["metric", "mean", "confidence interval of the mean", "prediction interval, one run"],
                [
                    [k, f"{v.mean:,.3f}", _span(v.ci95_low, v.ci95_high), _span(v.pi95_low, v.pi95_high)]
                    for k, v in r.intervals.items()
                ],
            )
        )
    if r.ttft_p95_ms is not None:
        cached, paged = r.prefix_hit_rate is not None, r.preemptions is not None
        token_rows = [_token_row(t, s, cached, paged) for t, s in r.per_tier.items()]
        token_rows.append(_token_row("all", r, cached, paged))
        tables.append(
            Table(
                "Tokens: time to first token, between tokens, per output token (ms)",
                ["tier", "TTFT P50", "TTFT P95", "TTFT P99", "ITL P50", "ITL P95", "ITL P99", "TPOT P50",
                 "TPOT P95", "tokens/s", "goodput req/s", *(["prefix cached"] if cached else []),
                 *(["preempted"] if paged else [])],
                token_rows,
                emphasis={len(token_rows) - 1},
            )
        )  # fmt: skip
    window = f"{r.duration_s:.4g} s measured after {r.warmup_s:g} s warm-up, seed {r.seed}"
    window += f", {r.replications} runs" if r.replications > 1 else ""
    facts = [
        ("offered", f"{r.offered_rps:,.0f} req/s" + (f" (base {r.rps:,.0f})" if r.rps else "")),
        ("throughput", f"{r.throughput_rps:,.0f} req/s"),
        ("load_factor", f"{r.load_factor:.2f}  (offered / full-batch capacity)"),
        ("gpu_busy", f"{r.gpu_busy:.2f}  (share of GPU time running batches or steps)"),
        ("mean batch", f"{r.mean_batch_size:.1f} over {r.batches:,} batches"),
        ("window", window + ("" if r.overlap else ", no overlap")),
    ]
    if r.precision is not None:
        facts.append(("precision", _precision_fact(r.precision)))
    if r.simulated_gpus is not None:
        facts.append(("sampled", _sampled(r.simulated_gpus).removeprefix("; ") + "; request counts are the sample's"))
    if r.lengths is not None:
        facts.append(("requests", f"{r.batching} batching, {'streamed' if r.stream else 'not streamed'}; {r.lengths}"))
    if r.autoscale is not None:
        facts.append(("autoscaler", _autoscale_fact(r.autoscale)))
        if r.autoscale.events:
            tables.append(
                Table(
                    "Autoscaler decisions",
                    ["time (s)", "action", "GPUs serving", "GPUs cold-starting"],
                    [[f"{e.t_s:,.0f}", e.action.value, str(e.gpus_up), str(e.gpus_cold)] for e in r.autoscale.events],
                )
            )
    return Summary(
        title="infer-plan simulate",
        headline=f"{_gpus(r.gpus)} at {r.offered_rps:,.0f} req/s offered: P95 {_ms(r.p95_ms)} ms",
        facts=facts,
        tables=tables,
    )


def _sampled(simulated_gpus: int | None) -> str:
    if simulated_gpus is None:
        return ""
    return (
        f"; each run {simulated_gpus} GPUs at their share of the load, rates scaled to the fleet (--sample-gpus 0: "
        "every GPU)"
    )


def _precision_fact(p: PrecisionReport) -> str:
    """``P95 120.2 ± 0.27 ms (95% CI), 4 P95s within ±0.22%: the ±1% target met after 10 s``."""
    if not p.intervals:
        return f"nothing to measure after {p.measured_s:,.4g} s"
    first = next(iter(p.intervals.values()))
    half = (first.high_ms - first.low_ms) / 2
    widest = "too few slices" if p.reached is None or p.reached == float("inf") else f"±{p.reached:.2%}"
    verdict = "met" if p.met else "not met in the longest run,"
    return (
        f"P95 {first.value_ms:,.1f} ± {half:,.2f} ms (95% CI), {len(p.intervals)} P95s within {widest}: "
        f"the ±{p.target:.1%} target {verdict} after {p.measured_s:,.4g} s"
    )


def _token_row(name: str, s: TokenStats, cached: bool = False, paged: bool = False) -> list[str]:
    """One tier's token figures; ``cached``: with the share of its prompt tokens the prefix cache held;
    ``paged``: with its preemptions."""
    cells = [s.ttft_p50_ms, s.ttft_p95_ms, s.ttft_p99_ms, s.itl_p50_ms, s.itl_p95_ms, s.itl_p99_ms]
    cells += [s.tpot_p50_ms, s.tpot_p95_ms]
    rates = [s.output_tokens_per_s, s.goodput_rps]
    row = [name, *[_ms(c) for c in cells], *["-" if x is None else f"{x:,.0f}" for x in rates]]
    if cached:
        row.append(_share(s.prefix_hit_rate))
    if paged:
        row.append(f"{s.preemptions or 0:,}")
    return row


def _autoscale_fact(log: AutoscaleLog) -> str:
    ordered = [e for e in log.events if e.action is ScaleAction.ORDERED]
    serving = [e for e in log.events if e.action is ScaleAction.SERVING]
    released = sum(e.action is ScaleAction.RELEASED for e in log.events)
    if not ordered and not released:
        return (
            f"on; no change: the load stayed above {log.scale_up_load:.0%} for {log.longest_above_s:.0f} s at most "
            f"and the policy waits {log.scale_up_after_s:.0f} s (peak load_factor {log.peak_load_factor:.2f})"
        )
    parts = [f"ordered {_gpus(len(ordered))}" + (f", first at {ordered[0].t_s:,.0f} s" if ordered else "")]
    if serving:
        parts.append(f"first serving at {serving[0].t_s:,.0f} s after its cold start")
    if released:
        parts.append(f"released {_gpus(released)}")
    return "; ".join([*parts, f"peak {_gpus(log.peak_gpus)} serving"])


def _gpus(n: int | None) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _search_fact(r: CapacityResult) -> list[tuple[str, str]]:
    if not r.simulations:
        return []
    return [("search", f"{r.simulations} GPU counts simulated, {r.jobs} at a time" + _sampled(r.simulated_gpus))]


def _capacity(r: CapacityResult) -> Summary:
    tiers = list(r.neighbours[0].per_tier_p95_ms) if r.neighbours else []
    tokens = any(n.ttft_p95_ms is not None for n in r.neighbours)
    neighbours = [
        [
            str(n.gpus),
            _ms(n.p95_ms),
            *[_ms(n.per_tier_p95_ms.get(t)) for t in tiers],
            *([_ms(n.ttft_p95_ms), _ms(n.itl_p95_ms)] if tokens else []),
            f"{n.load_factor:.2f}",
            f"{n.gpu_busy:.2f}",
            _pct(n.rejected_fraction),
            "yes" if n.meets else "no: " + ", ".join(n.failed),
        ]
        for n in r.neighbours
    ]
    token_headers = ["TTFT P95", "ITL P95"] if tokens else []
    tables = [
        Table(
            "Neighbouring GPU counts (simulated)",
            ["GPUs", "P95", *[f"P95 {t}" for t in tiers], *token_headers, "load", "gpu_busy", "rejected", "meets"],
            neighbours,
            emphasis={i for i, n in enumerate(r.neighbours) if n.gpus == r.gpus},
        )
    ]
    if not neighbours:  # planned from a measured sweep: nothing simulated
        tables = []
    if r.sweep:
        tables.append(
            Table(
                "GPUs versus rps",
                ["rps", "GPUs (simulated)", "raw GPUs", "at ceiling", "P95"],
                [
                    [f"{p.rps:,.0f}", str(p.gpus or "-"), f"{p.raw_gpus:.2f}", str(p.gpus_at_ceiling), _ms(p.p95_ms)]
                    for p in r.sweep
                ],
            )
        )
    if r.gpus is None:
        headline = f"No GPU count up to {r.search_limit} meets every constraint at {r.rps:,.0f} req/s"
    else:
        headline = (
            f"{r.gpus} GPUs for {r.rps:,.0f} req/s: P95 {_ms(r.p95_ms)} ms (SLO {r.constraints['e2e_p95_ms']:g}), "
            f"load_factor {r.load_factor:.2f} (ceiling {r.constraints['max_load']:g}), gpu_busy {r.gpu_busy:.2f}"
        )
        if r.ttft_p95_ms is not None:
            headline += f"; TTFT P95 {_ms(r.ttft_p95_ms)} ms, ITL P95 {_ms(r.itl_p95_ms)} ms"
    notes = list(r.explanation)
    if r.alternatives:
        answers = [f"{p.batching}: {p.gpus if p.gpus is not None else 'none found'}" for p in [r, *r.alternatives]]
        notes.append("GPUs by batching mode: " + "; ".join(answers) + ".")
    mode = f" ({r.batching} batching)" if r.ttft_p95_ms is not None or r.alternatives else ""
    mode = " (from a measured sweep)" if r.batching == "measured" else mode
    return Summary(
        title=f"infer-plan capacity{mode}",
        headline=headline,
        verdict=Verdict.FAIL if r.gpus is None else Verdict.PASS,
        facts=[
            ("binding constraint", r.binding_constraint),
            ("constraints", ", ".join(f"{k} {v:g}" for k, v in r.constraints.items())),
            *([("precision", _precision_fact(r.precision))] if r.precision is not None else []),
            *_search_fact(r),
        ],
        blocks=[Block("back-of-envelope", r.back_of_envelope.arithmetic)],
        notes=notes,
        tables=tables,
    )


def _loadtest(r: LoadTestResult) -> Summary:
    keys = ("p50_ms", "p95_ms", "p99_ms")
    rows = []
    for name, s in [*r.per_tier.items(), ("all", r.overall)]:
        sim, err = s.simulated_ms or LatencyStats(), s.relative_error or {}
        rows.append(
            [name]
            + [_ms(getattr(s.measured_ms, k)) for k in keys]
            + [_ms(getattr(sim, k)) for k in keys]
            + [_pct(err.get(k)) for k in keys]
        )
    gates = [[g.name, "PASS" if g.passed else "FAIL", g.detail] for g in r.gates]
    target = f"{r.target} ({r.url})" if r.url != r.target else r.target
    token_facts = []
    if r.api != "inference":
        token_facts.append(("api", f"{r.api}, {'streamed' if r.stream else 'not streamed'}"))
        token_facts.append(("token counts", r.token_counts or "no answer carried tokens"))
    if r.burst_gap_share is not None and r.burst_gap_share >= BURST_NOTE_SHARE:
        lag = (
            "the client or the target's front end fell behind (short of CPU?), so TTFT, ITL and TPOT time that "
            "lag, not the engine's steps; spread the load over --workers, lower it, or use a quieter host"
        )
        token_facts.append(("token gaps", f"{r.burst_gap_share:.0%} under 0.1 ms, tokens read at once: {lag}"))
    if r.server_metrics is not None:
        token_facts.append(("target's metrics", _server_metrics_line(r)))
    if r.failures:
        top = list(r.failures.items())[:3]
        token_facts.append(("failures", "; ".join(f"{n:,} x {why}" for why, n in top)))
    return Summary(
        title="infer-plan loadtest",
        headline=f"{'PASSED' if r.passed else 'FAILED'}: {r.requests:,} requests at {r.rps:,.0f} req/s "
        f"against {r.target}",
        verdict=Verdict.PASS if r.passed else Verdict.FAIL,
        facts=[
            ("target", target + (f", {r.gpus} GPU(s)" if r.gpus else "")),
            (
                "sent",
                f"{r.achieved_rps:,.0f} req/s (shortfall {r.shortfall:.1%}, send lag P95 {r.send_lag_p95_ms:.1f} ms), "
                f"{r.workers or 1} Locust process(es)",
            ),
            ("statuses", ", ".join(f"{k}: {v:,}" for k, v in r.status_counts.items())),
            ("errors / rejects", f"{r.error_rate:.3%} / {r.reject_rate:.3%}; wrong outputs {r.wrong_outputs}"),
            *([("batch-log check", batch_log_summary(r.batch_log_check))] if r.batch_log_check else []),
            *token_facts,
        ],
        tables=[
            Table(
                "Latency from scheduled send (ms): measured vs simulated",
                ["tier", "P50", "P95", "P99", "sim P50", "sim P95", "sim P99", "err P50", "err P95", "err P99"],
                rows,
                emphasis={len(rows) - 1},
            ),
            *_token_table(r),
            *_turn_table(r),
            Table("Gates", ["gate", "result", "detail"], gates),
        ],
    )


def _token_table(r: LoadTestResult) -> list[Table]:
    """TTFT (from scheduled send), ITL, TPOT, tokens/s and goodput per tier: measured, simulated, error."""
    scopes = [(name, s.tokens) for name, s in [*r.per_tier.items(), ("all", r.overall)] if s.tokens is not None]
    if not scopes:
        return []
    rows = []
    cached = any(t.measured.prefix_hit_rate is not None or (t.simulated and t.simulated.prefix_hit_rate is not None)
                 for _, t in scopes)  # fmt: skip
    for name, t in scopes:
        sim, err = t.simulated or TokenStats(), t.relative_error
        rows.append(
            [
                name,
                _ms(t.measured.ttft_p50_ms),
                _ms(t.measured.ttft_p95_ms),
                _ms(sim.ttft_p95_ms),
                _pct(err.get("ttft_p95_ms")),
                _ms(t.measured.itl_p50_ms),
                _ms(t.measured.itl_p95_ms),
                _ms(sim.itl_p95_ms),
                _pct(err.get("itl_p95_ms")),
                _ms(t.measured.tpot_p95_ms),
                _ms(t.measured.output_tokens_per_s),
                _ms(t.measured.goodput_rps),
                *([f"{_share(t.measured.prefix_hit_rate)} / {_share(sim.prefix_hit_rate)}"] if cached else []),
            ]
        )
    headers = ["tier", "TTFT P50", "TTFT P95", "sim", "err", "ITL P50", "ITL P95", "sim", "err", "TPOT P95",
               "tokens/s", "goodput", *(["prefix cached / sim"] if cached else [])]  # fmt: skip
    return [Table("Tokens (ms; TTFT from scheduled send): measured vs simulated", headers, rows, {len(rows) - 1})]


def _turn_table(r: LoadTestResult) -> list[Table]:
    """Sessions: each turn's TTFT and cached share, measured beside simulated (the later turns find their history)."""
    if not r.turns:
        return []
    rows = [
        [str(t.turn), f"{t.requests:,}", _ms(t.prompt_tokens_mean), _ms(t.ttft_p50_ms), _ms(t.simulated_ttft_p50_ms),
         _ms(t.ttft_p95_ms), _ms(t.simulated_ttft_p95_ms),
         f"{_share(t.prefix_hit_rate)} / {_share(t.simulated_prefix_hit_rate)}"]
        for t in r.turns
    ]  # fmt: skip
    headers = ["turn", "requests", "prompt tokens", "TTFT P50", "sim", "TTFT P95", "sim", "prefix cached / sim"]
    return [Table("Sessions by turn (ms): measured vs simulated", headers, rows)]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _server_metrics_line(r: LoadTestResult) -> str:
    m = r.server_metrics
    assert m is not None
    peaks = []
    for label, series in (("waiting", m.waiting), ("running", m.running)):
        values = [v for v in series if v is not None]
        if values:
            peaks.append(f"{label} peak {max(values):,.0f} ({m.names[label]})")
    seen = ", ".join(peaks) or "none of the known queue gauges"
    return f"{len(m.t_s)} samples of {m.url}: {seen}" + (f"; {m.failed_scrapes} failed" if m.failed_scrapes else "")


_CELL_NAMES = {
    "lone": "lone TTFT", "wake": "lone TTFT, engine idle", "decode": "decode gap", "mixed": "a newcomer's cost",
    "traffic_ttft": "TTFT, median request", "traffic_decode": "decode time, median request",
}  # fmt: skip


def _spread(quantiles: list[float]) -> str:
    """The steps' measured spread as a user reads it: the median, P95 and longest step against the fitted one."""
    if not quantiles:
        return "none measured: every step lasts the formula's time"

    def at(q: float) -> float:  # linear between the evenly spaced quantiles
        x = q * (len(quantiles) - 1)
        lo = min(int(x), len(quantiles) - 2)
        return quantiles[lo] + (x - lo) * (quantiles[lo + 1] - quantiles[lo])

    p50, p95 = at(0.5), at(0.95)
    return f"a step is x{p50:.2f} the formula at the median, x{p95:.2f} at P95, x{quantiles[-1]:.2f} at most"


def _continuous_calibration(r: CalibrationResult) -> Summary:
    """A continuous engine's fit: the step and overhead terms, each streamed cell against its fit, the limits."""
    rows = [
        [_CELL_NAMES[c.kind], str(c.sequences), str(c.prefill_tokens), str(c.context_tokens or "-"), str(c.samples),
         _ms(c.median_ms), _ms(c.p95_ms), _ms(c.fitted_ms),
         _pct(abs(c.fitted_ms - c.median_ms) / c.median_ms if c.median_ms else None)]
        for c in r.stream_cells
    ]  # fmt: skip
    limits = ", ".join(f"{name} {value:,} ({r.limit_sources.get(name, '-')})" for name, value in r.limits.items())
    context = (
        f"{r.decode_ms_per_kv_token:.3g} ms x context decoded + {r.prefill_ms_per_token_sq:.3g} ms x prefill^2 + "
        if r.decode_ms_per_kv_token or r.prefill_ms_per_token_sq
        else ""
    )
    return Summary(
        title="infer-plan calibrate",
        headline=(
            f"fitted: step = {r.decode_step_ms:.4f} ms + {r.prefill_ms_per_token:.6f} ms x prefilled tokens + "
            f"{r.decode_ms_per_seq:.5f} ms x sequences + {context}"
            f"{r.admit_ms_per_request:.3f} ms x requests it admits"
            f"{f' + {r.idle_wake_ms:.3f} ms if it starts an idle engine' if r.idle_wake_ms else ''}; "
            f"a request joins {r.request_overhead_ms:.3f} ms + {r.tokenize_ms_per_token:.6f} ms x prompt tokens "
            f"after it arrives ({r.backend})"
        ),
        facts=[
            ("method", "streamed requests" if r.mode == "streamed" else "a load test's saved requests"),
            ("fit error", f"max {r.max_relative_error:.1%}, mean {r.mean_relative_error:.1%} over the cells"),
            ("step spread", _spread(r.cycle_jitter)),
            ("engine limits", limits or "-"),
            ("profile written", f"{r.profile_path}: use it with --profile" if r.profile_path else "-"),
        ],
        tables=[Table("Streamed cells (ms): measured median against the fitted model",
                      ["cell", "sequences", "prefill", "context", "samples", "median", "P95", "fitted", "fit error"],
                      rows)],
    )  # fmt: skip


def _calibration(r: CalibrationResult) -> Summary:
    if r.knee_fit is not None:
        from .sweep_report import knee_fit_summary  # it imports this module's layout types

        return knee_fit_summary(r)
    if r.mode != "static":
        return _continuous_calibration(r)
    tokens = any(p.prompt_tokens is not None for p in r.points)
    rows = [
        [
            str(p.batch_size),
            *([str(p.prompt_tokens), str(p.output_tokens)] if tokens else []),
            _ms(p.median_ms),
            _ms(p.p95_ms),
            _ms(p.min_ms),
            _ms(p.fitted_ms),
            _pct(abs(p.fitted_ms - p.median_ms) / p.median_ms if p.median_ms else None),
        ]
        for p in r.points
    ]
    spread = " .. ".join(f"{q:.2f}" for q in r.cycle_jitter[:: max(1, len(r.cycle_jitter) // 4)])
    headline = f"fitted: batch latency = {r.fixed_ms:.2f} ms + {r.per_item_ms:.4f} ms x batch size"
    facts = []
    if tokens:
        headline = (
            f"fitted: batch of n = {r.fixed_ms:.2f} ms + {r.per_item_ms:.4f} ms x n"
            f" + {r.decode_step_ms:.4f} ms x output + {r.prefill_ms_per_token:.6f} ms x n x prompt"
            f" + {r.decode_ms_per_seq:.5f} ms x n x output"
        )
        facts.append(
            ("step time", f"{r.decode_step_ms:.4f} ms + {r.prefill_ms_per_token:.6f} ms x prefilled tokens"
             f" + {r.decode_ms_per_seq:.5f} ms x sequences (continuous batching)")
        )  # fmt: skip
    if r.phases is not None:
        facts.append(
            ("phases", f"PCIe in {r.phases['pcie_in_ms']:.3f} ms, kernel {r.phases['kernel_ms']:.3f} ms, "
             f"PCIe out {r.phases['pcie_out_ms']:.3f} ms (the fixed cost, as the backend timed it)")
        )  # fmt: skip
    cells = "cell" if tokens else "size"
    cells_named = "batch size, prompt and output" if tokens else "batch size"
    columns = ["batch size", *(["prompt", "output"] if tokens else []), "median", "P95", "min", "fitted", "fit error"]
    return Summary(
        title="infer-plan calibrate",
        headline=f"{headline} ({r.backend})",
        facts=[
            *facts,
            ("fit error", f"max {r.max_relative_error:.1%}, mean {r.mean_relative_error:.1%}"),
            ("measurements", f"{r.repetitions} per {cells} after {r.warmup_batches} warm-up batches"),
            ("spread", f"batch time x {spread}" if spread else "-"),
            ("profile written", f"{r.profile_path}: use it with --profile" if r.profile_path else "-"),
        ],
        tables=[Table(f"Batch latency by {cells_named} (ms)", columns, rows)],
    )


def batch_log_summary(c: BatchLogCheck) -> str:
    """One line: the simulation re-run with the batch times the server logged during the load test."""
    sim, err = c.overall.simulated_ms or LatencyStats(), c.overall.relative_error or {}
    return (
        f"simulated with a fit of {c.batches:,} batches the server logged during the run "
        f"({c.fixed_ms:.1f} ms + {c.per_item_ms:.2f} ms/item, sizes {c.sizes[0]}-{c.sizes[-1]}): "
        f"P50 {_ms(sim.p50_ms)} ms, P95 {_ms(sim.p95_ms)} ms (P95 error {_pct(err.get('p95_ms'))})"
    )
