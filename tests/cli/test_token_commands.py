"""The token-level model from the command line: both batching modes planned side by side, token metrics, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli as cli

EXAMPLE = Path(__file__).parents[2] / "examples/profiles/llama-3.1-8b-instruct-h100.toml"


def test_capacity_plans_both_batching_modes_and_continuous_needs_fewer_gpus(tmp_path):
    saved = tmp_path / "plan.json"
    done = cli(
        "capacity", "--profile", str(EXAMPLE), "--rps", "500", "--slo-ttft-p95-ms", "1000",
        "--batching", "static,continuous", "--duration", "20", "--save", str(saved),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    static = json.loads(saved.read_text())
    continuous = static["alternatives"][0]
    assert (static["batching"], continuous["batching"]) == ("static", "continuous")
    for plan in (static, continuous):  # each meets the TTFT and E2E objectives at its own GPU count
        assert plan["ttft_p95_ms"] <= 1000 and plan["p95_ms"] <= plan["constraints"]["e2e_p95_ms"]
    assert continuous["gpus"] < static["gpus"]
    assert "(static batching)" in done.stdout and "(continuous batching)" in done.stdout
    assert f"static: {static['gpus']}; continuous: {continuous['gpus']}" in done.stdout
    # BLIS's alphas are in the example profile: the arithmetic names them, and they cost no GPU time.
    arithmetic = continuous["back_of_envelope"]["arithmetic"]
    assert any(line.startswith("engine overheads (no GPU time): 0.232462 + 0.00175236 x 512 = 1.130 ms before")
               for line in arithmetic), arithmetic  # fmt: skip


def test_simulate_reports_ttft_itl_tpot_and_goodput(tmp_path):
    done = cli(
        "simulate", "--profile", str(EXAMPLE), "--gpus", "2", "--rps", "100", "--duration", "30",
        "--prompt-tokens", "uniform:100,900", "--output-tokens", "64", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["batching"] == "continuous" and "uniform" in result["lengths"]
    assert 0 < result["ttft_p50_ms"] <= result["ttft_p95_ms"] <= result["p95_ms"]
    assert 0 < result["itl_p50_ms"] <= result["itl_p95_ms"] and result["tpot_p50_ms"] > 0
    # Every completed request carries 64 tokens: tokens/s is 64 x the completion rate (tokens/s counts the
    # window's arrivals, throughput the window's completions: they differ by the requests in flight at its edges).
    assert result["output_tokens_per_s"] == pytest.approx(64 * result["throughput_rps"], rel=0.02)
    assert 0 < result["goodput_rps"] <= result["requests"] / result["duration_s"]  # good ones among the arrivals
    for tier in result["per_tier"].values():
        assert tier["ttft_p95_ms"] > 0 and tier["itl_p95_ms"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt-tokens", "lognormal:mean=512"], "lognormal needs mean, sd"),
        (["--output-tokens", "0"], "a token count must be >= 1"),
        (["--output-tokens", "lots"], "neither a token count nor a distribution"),
        (["--batching", "dynamic"], "'static' or 'continuous'"),
        (["--dataset", "missing.jsonl"], "dataset file not found"),
        (["--dataset", "{bad_dataset}"], "bad.jsonl:2: 'output_tokens' must be a whole number of tokens"),
        (["--scenario", "{negative}"], "decode_step_ms: Input should be greater than or equal to 0"),
        (["--scenario", "{word}"], "prefill_ms_per_token: Input should be a valid number"),
        (["--scenario", "{tiny_kv}"], "no request fits the KV cache of 100 tokens"),
    ],
)
def test_bad_token_input_is_one_line_and_exit_2(tmp_path, args, needle):
    files = {
        "bad_dataset": ('{"prompt_tokens": 5, "output_tokens": 9}\n{"prompt_tokens": 5, "output_tokens": -1}', "jsonl"),
        "negative": ("[service]\ndecode_step_ms = -1\n", "toml"),
        "word": ('[service]\nprefill_ms_per_token = "fast"\n', "toml"),
        "tiny_kv": ('[service]\nbatching = "continuous"\ndecode_step_ms = 5\nkv_cache_tokens = 100\n', "toml"),
    }
    paths = {}
    for name, (text, ext) in files.items():
        paths[name] = tmp_path / f"{'bad' if name == 'bad_dataset' else name}.{ext}"
        paths[name].write_text(text)
    args = [a.format(**paths) for a in args]
    done = cli("simulate", "--gpus", "1", "--rps", "10", "--duration", "5", *args)
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
