"""Options shared by several commands, and how flags become the service model.

Flags override the scenario file, which overrides the defaults; nothing below the CLI
reads flags or the environment itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import UsageError
from ..core.model import KvPolicy, Routing
from ..server.backends.base import Backend, EngineFlags, backend_names
from ..sim.inputs.arrivals import ArrivalProcess
from ..sim.inputs.public_traces import TraceFormat
from ..sim.runner import RunSettings
from ..sim.scenario import Scenario, load_scenario
from .parsing import parse_spike, parse_tier_mix

__all__ = ["FLAG_OF", "backend_options", "build_scenario", "parse_spike", "slo_flags"]

ScenarioOpt = Annotated[Path | None, typer.Option("--scenario", help="TOML scenario file ([service], [load], [run]).")]
ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="Calibrated profile from 'infer-plan calibrate'.")]
TierMixOpt = Annotated[str | None, typer.Option("--tier-mix", help="e.g. enterprise=0.1,paid=0.3,free=0.6")]
NoOverlapOpt = Annotated[bool, typer.Option("--no-overlap", help="Assembly holds the GPU too (150 ms cycle).")]
SloOpt = Annotated[float | None, typer.Option("--slo-p95-ms", min=0.001, help="P95 objective, ms [default: 500].")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", min=1, help="Most requests in one batch [100].")]
MaxWaitOpt = Annotated[float | None, typer.Option("--max-wait-ms", min=0, help="Assembly timeout, ms [40].")]
KernelOpt = Annotated[float | None, typer.Option("--kernel-ms", min=0, help="Kernel time per batch, ms [100].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DurationOpt = Annotated[float | None, typer.Option("--duration", min=0.001, help="Measured simulated seconds [60].")]
WarmupOpt = Annotated[
    float | None, typer.Option("--warmup", min=0, help="Simulated seconds excluded first [10; a trace: 0].")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed [0].")]
MinDurationOpt = Annotated[
    float | None, typer.Option("--min-duration", min=0.001, help="With --precision: measure at least this long [10].")
]
SaveRequestsOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-requests", help="Write every request (its times, outcome, lengths; a load test's status) to this CSV."
    ),
]


RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="--backend ray: join this cluster (auto, HOST:PORT, ray://HOST:PORT) [local]."),
]
RayEngineOpt = Annotated[str, typer.Option("--ray-engine", help="--backend ray: the engine in each actor [sim].")]


def precision_option(default: str) -> object:
    """``--precision``: stop once each P95 in play is known this well; 0 runs the whole --duration."""
    return typer.Option(
        "--precision",
        min=0,
        max=0.5,
        help=f"Stop once every P95 in play is within this relative half-width (95% CI); 0: run all of --duration "
        f"[{default}].",
    )


SampleGpusOpt = Annotated[
    int | None,
    typer.Option(
        "--sample-gpus",
        min=0,
        help="Continuous batching on more GPUs: simulate this many at their share of the load; 0: every GPU [24].",
    ),
]


def with_run_flags(
    settings: RunSettings, precision: float | None, min_duration: float | None, sample_gpus: int | None
) -> RunSettings:
    """The run settings as the command line asks: the precision stop (0: off, a fixed duration) and the replica
    sample (0: every GPU)."""
    update: dict[str, object] = {}
    if precision is not None:
        update["precision"] = precision or None
    if min_duration is not None:
        update["min_duration_s"] = min_duration
    if sample_gpus is not None:
        update["sample_gpus"] = sample_gpus or None
    return settings.model_copy(update=update) if update else settings


JsonFlagOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
SaveOpt = Annotated[Path | None, typer.Option("--save", help="Also write the result JSON to this file.")]
ArrivalOpt = Annotated[ArrivalProcess | None, typer.Option("--arrival", help="Arrival process [poisson].")]
SpikeOpt = Annotated[list[str] | None, typer.Option("--spike", help="FACTOR:AT_S:DURATION_S, e.g. 3:120:60.")]
KeysOpt = Annotated[
    Path | None,
    typer.Option("--keys", help="TOML [keys] table: key = tier, or key = { tier, rps, burst, max_in_flight }."),
]

# The token-level model (SPEC section 10), on simulate, capacity and loadtest alike.
BatchingOpt = Annotated[str | None, typer.Option("--batching", help="static or continuous (default: the scenario's).")]
PromptTokensOpt = Annotated[
    str | None, typer.Option("--prompt-tokens", help="Prompt length: a number or e.g. lognormal:mean=512,sd=256.")
]
OutputTokensOpt = Annotated[
    str | None, typer.Option("--output-tokens", help="Output length: a number or e.g. uniform:64,1024.")
]
DatasetOpt = Annotated[
    Path | None,
    typer.Option(
        "--dataset",
        help="JSONL of prompt_tokens/output_tokens[/timestamp/tier], ShareGPT, or a public trace as published "
        "(Mooncake, Bailian, Azure, BurstGPT, Vidur).",
    ),
]
DatasetFormatOpt = Annotated[
    TraceFormat | None,
    typer.Option("--dataset-format", help="The --dataset file's format (default: read from its first row)."),
]
PrefixCachingOpt = Annotated[
    bool | None,
    typer.Option(
        "--prefix-caching/--no-prefix-caching",
        help="Continuous batching: reuse cached prompt blocks (default: the scenario's prefix_caching).",
    ),
]
KvPolicyOpt = Annotated[
    KvPolicy | None,
    typer.Option(
        "--kv-policy",
        help="Continuous batching: reserve (prompt + output KV taken at admission) or paged (blocks as a "
        "sequence grows; preempt the lowest tier's latest when none is free) (default: the scenario's).",
    ),
]
RoutingOpt = Annotated[
    Routing | None,
    typer.Option(
        "--routing",
        help="Continuous batching: shared_queue (one waiting room), or each request routed at arrival to one "
        "replica: round_robin, least_loaded, prefix_affinity (default: the scenario's routing).",
    ),
]
SharedPrefixOpt = Annotated[
    str | None,
    typer.Option(
        "--shared-prefix",
        help="TOKENS:COUNT[:zipf=S]: each prompt starts with one of COUNT system prompts of TOKENS tokens "
        "(uniform, or Zipf S over their ranks); with prefix_caching on, their blocks are reused.",
    ),
]
SessionsOpt = Annotated[
    str | None,
    typer.Option(
        "--sessions",
        help="TURNS (a number or a distribution): conversations started at --rps, each turn the whole history plus "
        "a message of --prompt-tokens, sent --think-time after the answer before it (continuous batching).",
    ),
]
ThinkTimeOpt = Annotated[
    str | None,
    typer.Option(
        "--think-time",
        help="Seconds from an answer to the session's next turn (a number or a "
        "distribution, e.g. exponential:mean=5). Default 0.",
    ),
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help="Counts a ShareGPT dataset's tokens (name or folder).")
]
StreamOpt = Annotated[bool, typer.Option("--stream/--no-stream", help="Requests stream their tokens.")]
TtftSloOpt = Annotated[float | None, typer.Option("--slo-ttft-p95-ms", min=0.001, help="Time to first token P95, ms.")]
ItlSloOpt = Annotated[float | None, typer.Option("--slo-itl-p95-ms", min=0.001, help="Inter-token latency P95, ms.")]
TpotSloOpt = Annotated[
    float | None, typer.Option("--slo-tpot-p95-ms", min=0.001, help="Time per output token P95, ms.")
]


def token_load(
    prompt_tokens: str | None,
    output_tokens: str | None,
    dataset: Path | None,
    tokenizer: str | None,
    stream: bool,
    dataset_format: TraceFormat | None = None,
    shared_prefix: str | None = None,
    sessions: str | None = None,
    think_time: str | None = None,
) -> dict[str, Any]:
    """The workload's token settings from the flags (lengths are parsed and checked by the workload)."""
    load: dict[str, Any] = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "dataset": dataset}
    load |= {"tokenizer": tokenizer, "stream": stream or None, "dataset_format": dataset_format}
    flags = {"shared_prefix": shared_prefix, "sessions": sessions, "think_time": think_time}
    return load | {name: value for name, value in flags.items() if value is not None}


# Which flag sets which field: errors from below the CLI name the field, the CLI names the flag.
FLAG_OF = {
    "rps": "--rps",
    "target": "--target",
    "gpus": "--gpus",
    "batch_log_url": "--batch-log",
    "device": "--device",
    "dtype": "--dtype",
    "api_key": "--api-key",
    "scrape_metrics_url": "--scrape-metrics",
    "stream": "--stream",
    "baseline": "--baseline",
    "overlap": "overlap = false (--no-overlap)",
    "warmup_s": "--warmup",
    "redis_url": "--redis",
    "keys_file": "--keys",
    "internal_host": "--internal-host",
    "sizes": "--sizes",
    "prompt_tokens": "--prompt-tokens",
    "output_tokens": "--output-tokens",
    "out": "--out",
}


def build_scenario(
    *,
    scenario: Path | None,
    profile: Path | None = None,
    tier_mix: str | None = None,
    no_overlap: bool = False,
    **service: Any,
) -> Scenario:
    """Scenario file, then profile, then flags; returns the validated scenario."""
    overrides: dict[str, Any] = dict(service)
    if tier_mix is not None:
        overrides["tiers"] = parse_tier_mix(tier_mix)
    if no_overlap:
        overrides["overlap"] = False
    return load_scenario(scenario, profile, overrides)


def slo_flags(**given: Any) -> dict[str, Any]:
    """The objectives given on the command line, as the service model's ``slos`` override (unset ones left out,
    so a scenario's own stay)."""
    return {key: value for key, value in given.items() if value is not None}


MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated per request (vllm, openai).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")]
MaxModelLenOpt = Annotated[int, typer.Option("--max-model-len", min=16, help="vLLM context length; prompts are cut.")]
TorchModelOpt = Annotated[
    str | None, typer.Option("--torch-model", help="torch: MODULE:FACTORY returning (module, preprocess).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch: cpu, cuda (one device per GPU worker) or cuda:N.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="torch: float32 (default), float16 or bfloat16; vllm: any of vLLM's (default: auto)."),
]


BackendOpt = Annotated[
    str,
    typer.Option("--backend", help=f"Engine: {' | '.join(backend_names())} | package.module:Class ('infer-plan "
                 "backends' lists each one's options)."),
]  # fmt: skip
BackendOptionOpt = Annotated[
    list[str] | None,
    typer.Option("--backend-option", "-o", help="KEY=VALUE: one of the backend's own options; repeat."),
]


def backend_options(backend: str, extra: list[str] | None, **flags: Any) -> dict[str, Any]:
    """The chosen backend's options: what it reads of the shared engine flags, then each ``--backend-option``."""
    pairs = {}
    for item in extra or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--backend-option: expected KEY=VALUE, got {item!r}")
        pairs[key.strip()] = value
    return Backend.options_for(backend, EngineFlags(**flags, extra=pairs))
