"""Load-generator headroom: the highest rate Locust sustains within 1% of target, 1 process vs 2 workers.

Run: python benchmarks/bench_locust.py [--rates 500,1000,1500,2000,3000] [--seconds 8]
     python benchmarks/bench_locust.py --stream --output-tokens 16 --rates 100,200,400,600,800
The target is the reference server with the sim backend at zero GPU time (pure server
overhead) and 16 GPUs so it never sheds; server and generator share this machine.
With ``--stream`` the requests are streamed completions of ``--output-tokens`` tokens
each, one SSE event per token, on continuous batching with 2 ms steps; a rate counts as
held when both requests/s and output tokens/s are within 1% of target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ZERO_GPU = "[service]\npcie_in_ms = 0\nkernel_ms = 0\npcie_out_ms = 0\ngpus = 16\n"
STEPS = 'batching = "continuous"\ndecode_step_ms = 2\nmax_num_seqs = 256\n'


def achieved(
    rate: float, seconds: float, workers: int, scenario: Path, out: Path, tokens: list[str]
) -> tuple[float, float, float | None]:
    """(requests/s sent, fraction answered 200, output tokens/s received; None without tokens)."""
    cmd = [
        sys.executable,
        "-m",
        "infer_plan.cli",
        "loadtest",
        "--target",
        "sim",
        "--rps",
        str(rate),
        "--duration",
        str(seconds),
        "--warmup",
        "1",
        "--scenario",
        str(scenario),
        "--workers",
        str(workers),
        "--json",
        str(out),
        "--max-error-rate",
        "1",
        "--max-reject-rate",
        "1",
        "--slo-p95-ms",
        "1e9",
        *tokens,
    ]
    subprocess.run(cmd, capture_output=True, check=False, timeout=seconds + 120)
    data = json.loads(out.read_text())
    ok = data["status_counts"].get("200", 0) / max(data["requests"], 1)
    token_rate = data["overall"]["tokens"]["measured"]["output_tokens_per_s"] if tokens else None
    return data["achieved_rps"], ok, token_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="500,1000,1500,2000,3000")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--stream", action="store_true", help="streamed completions instead of /v1/inference")
    parser.add_argument("--output-tokens", type=int, default=16)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    n = args.output_tokens
    tokens = ["--api", "completions", "--stream", "--prompt-tokens", "16", "--output-tokens", str(n)]
    tokens = tokens if args.stream else []
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "zero.toml"
        scenario.write_text(ZERO_GPU + (STEPS if args.stream else ""))
        for workers in (0, 2):
            best = 0.0
            for rate in rates:
                got, ok, token_rate = achieved(rate, args.seconds, workers, scenario, Path(tmp) / "out.json", tokens)
                within = got >= 0.99 * rate and ok >= 0.99
                received = ""
                if token_rate is not None:
                    within = within and token_rate >= 0.99 * rate * n
                    received = f", {token_rate:>8,.0f} tokens/s ({token_rate / (rate * n):.1%})"
                print(
                    f"workers={workers} target {rate:>6,.0f} req/s: sent {got:>7,.0f} ({got / rate:.1%}){received}, "
                    f"{ok:.1%} answered 200 {'ok' if within else 'short'}",
                    flush=True,
                )
                if within:
                    best = rate
                else:
                    break
            label = "one Locust process" if workers == 0 else f"{workers} Locust workers"
            print(f"=> {label}: highest rate within 1% of target: {best:,.0f} req/s", flush=True)


if __name__ == "__main__":
    main()
