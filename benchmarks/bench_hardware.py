"""Profiles for hardware one does not own (issue #29): the fit, AIConfigurator's own answer, published throughput.

Run: python benchmarks/bench_hardware.py [--repeats 3] [--skip-search]
Needs the hardware extra (aiconfigurator-core 0.12.0). Prints:
  1. the derived step model's fit error over its 510 step estimates (8B/H100 TP1, 70B/H100 TP4, vLLM);
  2. the per-replica rate at which TTFT P95 <= 500 ms and TPOT P95 <= 30 ms hold for Llama-3.1-8B on one
     H100 under vLLM, 512/128 tokens, beside the answer of AIConfigurator's own recommender for the same
     question (`aiconfigurator cli recommend --model-path meta-llama/Meta-Llama-3.1-8B --system h100_sxm
     --backend vllm --isl 512 --osl 128 --ttft 500 --tpot 30 --target-request-rate 20`: 1 GPU, 55.1 req/s
     per GPU; aiconfigurator 0.12.0 on a machine like this one, ../shared/notes/aiconfigurator.md);
  3. saturation output throughput simulated for TensorRT-LLM's published measurements (perf overview,
     https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/docs/source/performance/perf-overview.md:
     Llama 3.3 70B FP8 on 2 x H100 SXM, trtllm-bench throughput: requests queued at once, tokens out per second);
  4. the wall time of `capacity --model meta-llama/Meta-Llama-3.1-70B --gpu h100_sxm,a100_sxm,l40s --tp 1,2,4,8
     --rps 30`, median of --repeats fresh processes (target: under 60 s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from infer_plan.calibrate.derive import derive_profile
from infer_plan.calibrate.hardware import HardwareConfig
from infer_plan.core import ServiceModel
from infer_plan.sim import RateSchedule
from infer_plan.sim.inputs.lengths import LengthDist
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.knee import slo_knee_rps
from infer_plan.sim.runner import RunSettings, run_simulation

REPO = Path(__file__).resolve().parents[1]
AICONFIGURATOR_RPS_PER_GPU = 55.1
# (ISL, OSL) -> published total output tokens/s, Llama 3.3 70B FP8, H100 TP2 (the perf overview above).
TRTLLM_70B_H100_TP2 = {(128, 128): 6378, (1000, 1000): 4205, (2048, 128): 762, (500, 2000): 5222}
NOT_HELD_MS = 3.6e6


def _workload(prompt: int, output: int) -> Workload:
    return Workload(
        schedule=RateSchedule(rps=1.0), prompt_tokens=LengthDist(kind="fixed", value=prompt),
        output_tokens=LengthDist(kind="fixed", value=output), stream=True,
    )  # fmt: skip


def fit_errors() -> None:
    print("1. step-model fit against aiconfigurator-core's estimates (P 0..8192, N 0..256, context 512..8192)")
    for model, tp in [("meta-llama/Meta-Llama-3.1-8B", 1), ("meta-llama/Meta-Llama-3.1-70B", 4)]:
        derived = derive_profile(HardwareConfig(model, "h100_sxm", tp, "vllm"))
        errors = derived.relative_errors
        print(f"   {model} TP{tp}: max {errors.max():.1%}, mean {errors.mean():.1%} over {errors.size} steps")


def against_aiconfigurator() -> None:
    derived = derive_profile(HardwareConfig("meta-llama/Meta-Llama-3.1-8B", "h100_sxm", 1, "vllm"))
    slos = {"e2e_p95_ms": NOT_HELD_MS, "ttft_p95_ms": 500.0, "tpot_p95_ms": 30.0}
    model = ServiceModel(**derived.service, slos=slos)
    started = time.perf_counter()
    rate = slo_knee_rps(model, _workload(512, 128), 1, RunSettings(duration_s=60, warmup_s=10, replications=3))
    ours = rate or 0.0
    print("2. Llama-3.1-8B, one H100, vLLM, 512/128 tokens, TTFT P95 <= 500 ms and TPOT P95 <= 30 ms:")
    print(
        f"   infer-plan {ours:.1f} req/s per replica ({time.perf_counter() - started:.1f} s), AIConfigurator "
        f"{AICONFIGURATOR_RPS_PER_GPU} req/s per GPU: {ours / AICONFIGURATOR_RPS_PER_GPU - 1:+.1%} (target 20%)"
    )


def against_published() -> None:
    derived = derive_profile(HardwareConfig("nvidia/Llama-3.1-70B-Instruct-FP8", "h100_sxm", 2, "trtllm"))
    model = ServiceModel(**derived.service, slos={"e2e_p95_ms": NOT_HELD_MS}, backpressure={"queue_limit": 64})
    print("3. saturation output tokens/s, Llama 70B FP8 on 2 x H100 SXM, TensorRT-LLM (published, perf overview):")
    for (prompt, output), published in TRTLLM_70B_H100_TP2.items():
        workload = _workload(prompt, output)
        offered = 3 * model.per_gpu_rps(workload.shape(model))
        # Offered three times what it can take, a short queue: what is admitted is what the replica serves.
        result = run_simulation(model, workload.at_rate(offered), RunSettings(duration_s=300, warmup_s=60), gpus=1,
                                keep_timeseries=False)  # fmt: skip
        simulated = result.output_tokens_per_s or 0.0
        print(f"   {prompt}/{output}: simulated {simulated:,.0f}, published {published:,} "
              f"({simulated / published - 1:+.1%}; target 25%)")  # fmt: skip


def search_time(repeats: int) -> None:
    args = [sys.executable, "-m", "infer_plan.cli", "capacity", "--model", "meta-llama/Meta-Llama-3.1-70B",
            "--gpu", "h100_sxm,a100_sxm,l40s", "--tp", "1,2,4,8", "--engine", "vllm", "--rps", "30",
            "--prompt-tokens", "512", "--output-tokens", "128", "--slo-ttft-p95-ms", "1000", "--slo-itl-p95-ms", "50",
            "--prices", str(REPO / "examples" / "gpu-prices.toml"), "--json"]  # fmt: skip
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            print(f"   the search failed: {done.stderr.strip()[-300:]}")
            return
    print(f"4. three GPUs x four TP degrees at 30 req/s: median {statistics.median(walls):.1f} s of {repeats} "
          f"fresh processes ({', '.join(f'{w:.1f}' for w in walls)}; target 60 s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    fit_errors()
    against_aiconfigurator()
    against_published()
    if not args.skip_search:
        search_time(args.repeats)


if __name__ == "__main__":
    main()
