"""``infer-plan loadtest``: open-loop Locust load with SLO gates, beside the simulator's prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..core.errors import ConfigError, UsageError
from ..core.schema import LoadTestResult, load_result
from ..loadtests.analysis import Baseline
from ..loadtests.apis import Api
from .options import (
    ArrivalOpt,
    BatchingOpt,
    DatasetFormatOpt,
    DatasetOpt,
    ItlSloOpt,
    KernelOpt,
    KeysOpt,
    KvPolicyOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    OutputTokensOpt,
    PrefixCachingOpt,
    ProfileOpt,
    PromptTokensOpt,
    QuietOpt,
    RoutingOpt,
    SaveRequestsOpt,
    ScenarioOpt,
    SeedOpt,
    SessionsOpt,
    SharedPrefixOpt,
    SloOpt,
    SpikeOpt,
    StreamOpt,
    ThinkTimeOpt,
    TierMixOpt,
    TokenizerOpt,
    TpotSloOpt,
    TtftSloOpt,
    build_scenario,
    parse_spike,
    slo_flags,
    token_load,
)
from .output import render_result, write_result_files
from .progress import status_progress
from .sweep import (
    DEFAULT_STEP_S,
    MaxRpsOpt,
    MaxSweepOpt,
    MinKneeOpt,
    RatesOpt,
    StepPrecisionOpt,
    SweepOpt,
    sweep_load,
)

if TYPE_CHECKING:
    from ..loadtests.spec import LoadTestSpec

TargetOpt = Annotated[str, typer.Option("--target", help="'sim' (start a sim-backend server) or a base URL.")]
RpsOpt = Annotated[
    float | None, typer.Option("--rps", min=0.001, help="Target arrival rate, requests/s (a sweep's lowest rate).")
]
SecondsOpt = Annotated[float | None, typer.Option("--duration", min=0.1, help="Seconds of load (a sweep's step).")]
WarmupOpt = Annotated[float, typer.Option("--warmup", min=0, help="First seconds excluded from results.")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", min=1, help="Fleet of the sim target (and the simulation).")]
ModelNameOpt = Annotated[str, typer.Option("--model", help="Model name sent in requests.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, max=64, help="Locust worker processes (0: local).")]
ErrorRateOpt = Annotated[float, typer.Option("--max-error-rate", min=0, max=1, help="Most errors allowed.")]
RejectRateOpt = Annotated[float, typer.Option("--max-reject-rate", min=0, max=1, help="Most 429s allowed.")]
BaselineOpt = Annotated[Path | None, typer.Option("--baseline", help="Earlier loadtest JSON to compare P95s with.")]
ToleranceOpt = Annotated[float, typer.Option("--baseline-tolerance", min=0, help="Allowed P95 growth.")]
JsonFileOpt = Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (one case per gate).")]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="Write the HTML report here.")]
ApiOpt = Annotated[Api, typer.Option("--api", help="inference (/v1/inference), completions or chat (OpenAI).")]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", help="One API key for every request (e.g. a LiteLLM master key).")
]
GoodputOpt = Annotated[
    float | None, typer.Option("--min-goodput", min=0, help="Least goodput, req/s meeting every SLO set.")
]
ScrapeOpt = Annotated[
    str | None,
    typer.Option("--scrape-metrics", help="A Prometheus /metrics URL to sample during the run (queue, running)."),
]
BatchLogOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-log", help="The target's internal URL: after the run, re-simulate with the batch times it logged."
    ),
]


def loadtest(
    target: TargetOpt,
    rps: RpsOpt = None,
    duration: SecondsOpt = None,
    warmup: WarmupOpt = 2.0,
    arrival: ArrivalOpt = None,
    spike: SpikeOpt = None,
    gpus: GpusOpt = None,
    model_name: ModelNameOpt = "sim",
    keys: KeysOpt = None,
    api_key: ApiKeyOpt = None,
    api: ApiOpt = Api.INFERENCE,
    stream: StreamOpt = False,
    prompt_tokens: PromptTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    dataset: DatasetOpt = None,
    dataset_format: DatasetFormatOpt = None,
    shared_prefix: SharedPrefixOpt = None,
    sessions: SessionsOpt = None,
    think_time: ThinkTimeOpt = None,
    prefix_caching: PrefixCachingOpt = None,
    routing: RoutingOpt = None,
    kv_policy: KvPolicyOpt = None,
    tokenizer: TokenizerOpt = None,
    batching: BatchingOpt = None,
    workers: WorkersOpt = 0,
    seed: SeedOpt = None,
    slo_p95_ms: SloOpt = None,
    slo_ttft: TtftSloOpt = None,
    slo_itl: ItlSloOpt = None,
    slo_tpot: TpotSloOpt = None,
    min_goodput: GoodputOpt = None,
    max_error_rate: ErrorRateOpt = 0.001,
    max_reject_rate: RejectRateOpt = 0.01,
    baseline: BaselineOpt = None,
    baseline_tolerance: ToleranceOpt = 0.10,
    tier_mix: TierMixOpt = None,
    max_batch: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    kernel_ms: KernelOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_file: JsonFileOpt = None,
    quiet: QuietOpt = False,
    junit_file: JunitOpt = None,
    html_file: HtmlOpt = None,
    batch_log: BatchLogOpt = None,
    scrape_metrics: ScrapeOpt = None,
    save_requests: SaveRequestsOpt = None,
    sweep: SweepOpt = False,
    rates: RatesOpt = None,
    max_rps: MaxRpsOpt = None,
    max_duration: MaxSweepOpt = 600.0,
    min_knee_rps: MinKneeOpt = None,
    step_precision: StepPrecisionOpt = 0.1,
) -> None:
    """Drive a server with open-loop Locust load; gate on latency, tokens, errors and rejects (exit 1 on a failure).

    With --sweep: find the highest rate at which every SLO set holds (exit 0; 1 when none holds or the knee is
    under --min-knee-rps; 3 when the target stops answering; 130 on Ctrl-C, the steps done written)."""
    flags, files = dict(locals()), {"json_file": json_file, "junit_file": junit_file, "html_file": html_file}
    (_sweep if sweep else _load)(flags, files)


def _sweep(f: dict[str, Any], files: dict[str, Path | None]) -> None:
    """Steps of the load the flags describe (--duration each, default 10 s; --rps the lowest rate, default auto)."""
    from ..loadtests import run  # noqa: F401  (Locust first: gevent must patch before anything imports ssl)

    base = _spec({**f, "duration": f["duration"] or DEFAULT_STEP_S, "rps": f["rps"] or 0.0})
    if base.workload.sessions is not None:  # its steps, knee and simulated knee are all requests per second
        raise UsageError("a sweep steps the request rate; --sessions sets the rate of conversations instead: "
                         "load-test sessions one rate at a time", field="sessions")  # fmt: skip
    sweep_load(base, rates=f["rates"], max_rps=f["max_rps"], max_duration=f["max_duration"],
               min_knee_rps=f["min_knee_rps"], precision=f["step_precision"], files=files,
               quiet=f["quiet"])  # fmt: skip


def _load(f: dict[str, Any], files: dict[str, Path | None]) -> None:
    """One load test at one rate: run, write, show, and exit 1 when a gate failed."""
    from ..loadtests.run import run_loadtest  # imports Locust, which needs gevent's patching first

    if f["rps"] is None or f["duration"] is None:
        raise UsageError("give --rps and --duration (or --sweep to search for the highest rate that holds)")
    spec, horizon = _spec(f), f["warmup"] + f["duration"]
    with status_progress(f"load test over {horizon:g} s", enabled=not f["quiet"], total=horizon) as bar:
        result = run_loadtest(spec, progress=lambda s: bar.update(bar.task_ids[0], completed=min(s, horizon)))
    write_result_files(result, **files)
    render_result(result)
    if not result.passed:
        raise typer.Exit(1)


def _spec(f: dict[str, Any]) -> LoadTestSpec:
    """The load test the flags ask for: scenario, then profile, then flags (as for simulate and capacity)."""
    from ..loadtests.spec import LoadTestSpec

    scen = build_scenario(
        scenario=f["scenario"], profile=f["profile"], tier_mix=f["tier_mix"], gpus=f["gpus"],
        max_batch=f["max_batch"], max_wait_ms=f["max_wait_ms"], kernel_ms=f["kernel_ms"], batching=f["batching"],
        prefix_caching=f["prefix_caching"], routing=f["routing"], kv_policy=f["kv_policy"],
        slos=slo_flags(
            e2e_p95_ms=f["slo_p95_ms"], ttft_p95_ms=f["slo_ttft"], itl_p95_ms=f["slo_itl"],
            tpot_p95_ms=f["slo_tpot"],
            max_error_rate=f["max_error_rate"], max_reject_rate=f["max_reject_rate"], min_goodput_rps=f["min_goodput"],
        ),
    )  # fmt: skip
    model = scen.model
    baseline = _baseline(f["baseline"])
    against = None if baseline is None else Baseline(baseline, f["baseline_tolerance"])
    workload = scen.workload(
        rps=f["rps"], arrival=f["arrival"], extra_segments=tuple(parse_spike(s) for s in f["spike"] or ()),
        tokens=f["api"].has_tokens or None,
        **token_load(
            f["prompt_tokens"], f["output_tokens"], f["dataset"], f["tokenizer"], f["stream"], f["dataset_format"],
            f["shared_prefix"], f["sessions"], f["think_time"],
        ),
    )  # fmt: skip
    if workload.sessions is not None and not f["api"].has_tokens:
        raise UsageError("a session's turns carry its history: send them with --api chat or --api completions",
                         field="sessions")  # fmt: skip
    # A URL target with a known model (a scenario or a profile) is one engine unless told otherwise.
    known = f["target"] == "sim" or f["scenario"] is not None or f["profile"] is not None
    return LoadTestSpec(
        target=f["target"], model=model, workload=workload, duration_s=f["duration"], baseline=against,
        warmup_s=f["warmup"], seed=f["seed"] or 0, gpus=model.gpus or (1 if known else None),
        model_name=f["model_name"], keys_file=f["keys"], workers=f["workers"], batch_log_url=f["batch_log"],
        api=f["api"], api_key=f["api_key"], scrape_metrics_url=f["scrape_metrics"],
        save_requests=f["save_requests"],
    )  # fmt: skip


def _baseline(path: Path | None) -> LoadTestResult | None:
    if path is None:
        return None
    loaded = load_result(path)
    if not isinstance(loaded, LoadTestResult):
        raise ConfigError(f"{path}: a loadtest result is needed as baseline, not {loaded.kind}", field="baseline")
    return loaded
