"""The torch backend's cycle on this machine: PCIe in, kernel and PCIe out per batch size, and what it plans.

Run: python benchmarks/bench_torch.py [--device cpu|cuda] [--sizes 1,8,32,100] [--repetitions 20]
      [--torch-model MODULE:FACTORY]
Each size is run ``--repetitions`` times after warm-up (inputs of 40-60 bytes, as the
tests send); the medians of each phase are printed, then the profile ``calibrate``
would write from them and the GPU count ``capacity --rps 10000`` answers with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from infer_plan.core import ServiceModel
from infer_plan.server.backends.base import Generate
from infer_plan.server.backends.torch_backend import PHASES, TorchBackend, TorchOptions


async def measure(device: str, sizes: list[int], repetitions: int, torch_model: str | None) -> dict[int, dict]:
    backend = TorchBackend(ServiceModel(), TorchOptions(device=device, torch_model=torch_model))
    await backend.start()
    table = {}
    for size in sizes:
        rows = []
        for r in range(repetitions):
            requests = [Generate(f"request {r}-{i}: the quick brown fox jumps over") for i in range(size)]
            await backend.run_batch(requests, 0)
            rows.append(backend.batch_phases(0))
        table[size] = {p: float(np.median([row[p] for row in rows])) for p in PHASES}
    await backend.close()
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1,8,32,100")
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--torch-model", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "CPU"
    print(f"torch {torch.__version__} on {args.device} ({where}), {torch.get_num_threads()} CPU threads")
    table = asyncio.run(measure(args.device, sizes, args.repetitions, args.torch_model))
    print(f"{'batch':>6} {'PCIe in ms':>11} {'kernel ms':>10} {'PCIe out ms':>12} {'total ms':>9}")
    for size, phases in table.items():
        total = sum(phases.values())
        print(f"{size:>6} {phases['pcie_in_ms']:>11.3f} {phases['kernel_ms']:>10.3f} {phases['pcie_out_ms']:>12.3f} "
              f"{total:>9.3f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "torch.toml"
        calibrate = [
            sys.executable, "-m", "infer_plan.cli", "calibrate", "--backend", "torch", "--device", args.device,
            "--sizes", args.sizes, "--repetitions", str(args.repetitions), "--out", str(profile), "--json",
        ]  # fmt: skip
        if args.torch_model:
            calibrate += ["--torch-model", args.torch_model]
        fit = json.loads(subprocess.run(calibrate, check=True, capture_output=True, text=True).stdout)
        per_item, error = fit["per_item_ms"], fit["max_relative_error"]
        print(f"profile: {fit['phases']} + {per_item:.4f} ms per item (fit error {error:.1%})")
        plan = subprocess.run(
            [sys.executable, "-m", "infer_plan.cli", "capacity", "--rps", "10000", "--profile", str(profile), "--json"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        answer = json.loads(plan.stdout)
        print(f"capacity --rps 10000 with this profile: {answer['gpus']} GPUs (P95 {answer['p95_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
