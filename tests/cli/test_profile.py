"""``infer-plan profile``: the extended step model fitted to NVIDIA AIConfigurator's kernel data (SPEC section 12).

Needs the ``hardware`` extra (aiconfigurator-core), which ``.ci/run`` installs; skipped without it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from infer_plan.cli.app import main
from infer_plan.core import ServiceModel

from tests.helpers import RAY_ENV, free_port, ray_head, run_cli, running_server

aiconfigurator = pytest.importorskip("aiconfigurator_core", reason="needs the hardware extra (aiconfigurator-core)")

pytestmark = pytest.mark.timeout(300)

EIGHT_B = "meta-llama/Meta-Llama-3.1-8B"
SEVENTY_B = "meta-llama/Meta-Llama-3.1-70B"


def derive(tmp_path: Path, *args: str) -> tuple[dict, Path]:
    out = tmp_path / "derived.toml"
    done = run_cli("profile", *args, "--out", str(out), "--json", timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), out


@pytest.mark.parametrize(("model", "tp"), [(EIGHT_B, 1), (SEVENTY_B, 4)])
def test_the_fit_holds_every_step_estimate_within_ten_percent(tmp_path, model, tp):
    """Must-show: <= 10% max relative error over P 0..8192, N 0..256, context 512..8192, recomputed here
    through the simulator's own step formula from the file as written."""
    fit, out = derive(tmp_path, "--model", model, "--gpu", "h100_sxm", "--tp", str(tp), "--engine", "vllm")
    service = tomllib.loads(out.read_text())["service"]
    model_ = ServiceModel(**{**service, "request_overhead_ms": 0.0})
    cells = fit["fit"]["cells"]
    assert {c["prefill"] for c in cells} >= {0, 8192} and {c["decoding"] for c in cells} >= {0, 256}
    assert {c["context"] for c in cells} >= {512, 8192} and any(c["prefix"] for c in cells)
    errors = []
    for c in cells:
        step = model_.step_ms(
            c["prefill"], c["decoding"] + (c["prefill"] > 0), kv_tokens=c["decoding"] * c["context"],
            prefill_sq=c["prefill"] ** 2, prefill_context=c["prefill"] * c["prefix"],
        )  # fmt: skip
        errors.append(abs(step - c["ms"]) / c["ms"])
    print(f"\n{model} TP{tp}: max {max(errors):.1%}, mean {np.mean(errors):.1%} over {len(cells)} cells")
    assert max(errors) <= 0.10 and max(errors) == pytest.approx(fit["fit"]["max_relative_error"], rel=1e-3)
    provenance = tomllib.loads(out.read_text())["profile"]
    assert provenance["kind"] == "derived" and provenance["tensor_parallelism"] == tp
    assert provenance["source"].startswith("aiconfigurator-core 0.12.0") and provenance["quantization"]
    assert service["batching"] == "continuous" and service["kv_cache_tokens"] > 100_000
    assert (service["max_num_seqs"], service["max_batched_tokens"]) == (1024, 8192)  # vLLM's defaults on an H100


@pytest.mark.slow
def test_a_derived_profile_plans_and_serves_unchanged(tmp_path):
    fit, out = derive(tmp_path, "--model", EIGHT_B, "--gpu", "h100_sxm", "--step-overhead-ms", "0.5")
    service = tomllib.loads(out.read_text())["service"]  # the host's time per step is added to the GPU's
    assert service["decode_step_ms"] == pytest.approx(fit["fit"]["terms"]["decode_step_ms"] + 0.5, abs=1e-6)
    done = run_cli("simulate", "--profile", str(out), "--rps", "20", "--gpus", "1", "--prompt-tokens", "512",
                   "--output-tokens", "64", "--duration", "20", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    simulated = json.loads(done.stdout)
    dispatch = fit["profile"]["dispatch_overhead_ms"]  # vLLM: 0.8 ms x 32 layers, before the first step
    assert dispatch == pytest.approx(25.6) and simulated["ttft_p50_ms"] > dispatch
    with running_server("--profile", str(out)) as server:
        done = run_cli("loadtest", "--target", server.url, "--profile", str(out), "--api", "completions", "--stream",
                       "--rps", "5", "--duration", "3", "--prompt-tokens", "64", "--output-tokens", "8",
                       "--slo-p95-ms", "60000", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_local_config_folder_needs_no_network(tmp_path):
    shipped = Path(aiconfigurator.__file__).parent / "model_configs" / "meta-llama--Meta-Llama-3.1-8B_config.json"
    folder = tmp_path / "my-llama"
    folder.mkdir()
    shutil.copy(shipped, folder / "config.json")
    fit, _ = derive(tmp_path, "--model", str(folder), "--gpu", "h100_sxm")
    assert fit["fit"]["max_relative_error"] <= 0.10 and fit["profile"]["model"] == str(folder)


def test_list_names_the_gpus_engines_and_models_with_data():
    done = run_cli("profile", "--list", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert "vllm" in listed["gpus"]["h100_sxm"] and "a100_pcie" not in listed["gpus"]
    assert EIGHT_B in listed["models"] and SEVENTY_B in listed["models"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "nope/Model", "--gpu", "h100_sxm"], "infer-plan does not download"),
        (["--model", EIGHT_B, "--gpu", "h100_pcie"], "GPUs with data: a100_sxm"),
        (["--model", EIGHT_B, "--gpu", "h100_sxm", "--engine", "tgi"], "choose sglang, trtllm, vllm"),
        (["--model", EIGHT_B, "--gpu", "h100_sxm", "--tp", "3"], "tensor parallelism must divide the heads"),
        (["--model", SEVENTY_B, "--gpu", "h100_sxm", "--tp", "1"], "does not fit 1 x h100_sxm"),
        (["--gpu", "h100_sxm"], "profile needs --model and --gpu"),
    ],
)
def test_bad_hardware_questions_are_one_line_and_exit_2(args, says):
    done = run_cli("profile", *args, timeout=120)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_without_the_extra_profile_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiconfigurator_core", None)  # find_spec answers None: not installed
    assert main(["profile", "--model", EIGHT_B, "--gpu", "h100_sxm"]) == 2
    assert "pip install 'infer-plan[hardware]'" in capsys.readouterr().err


# -- capacity over hardware: every (GPU, TP) derived, planned and ranked ---------------------------------------

PRICES = Path(__file__).resolve().parents[2] / "examples" / "gpu-prices.toml"
LLM_LOAD = ["--rps", "30", "--prompt-tokens", "512", "--output-tokens", "128", "--slo-ttft-p95-ms", "1000",
            "--slo-itl-p95-ms", "50", "--duration", "30"]  # fmt: skip


@pytest.mark.slow
def test_capacity_ranks_every_gpu_and_tp_by_cost_and_marks_the_frontier(tmp_path):
    saved = tmp_path / "hardware.json"
    done = run_cli("capacity", "--model", EIGHT_B, "--gpu", "h100_sxm,l40s", "--tp", "1,2", "--prices", str(PRICES),
                   *LLM_LOAD, "--save", str(saved), timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    plan = json.loads(saved.read_text())
    assert plan["kind"] == "hardware_plan" and plan["ranked_by"] == "USD per hour"
    options = plan["options"]
    assert {(o["gpu"], o["tp"]) for o in options} == {("h100_sxm", 1), ("h100_sxm", 2), ("l40s", 1), ("l40s", 2)}
    planned = [o for o in options if o["replicas"] is not None]
    assert planned and planned[0]["pareto"], options
    costs = [o["usd_per_hour"] for o in planned]
    assert costs == sorted(costs)
    prices = tomllib.loads(PRICES.read_text())["prices"]
    for o in planned:  # a replica is TP GPUs; cost and cost per token follow from the plan and the price
        assert o["gpus"] == o["replicas"] * o["tp"] == o["plan"]["gpus"] * o["tp"]
        assert o["usd_per_hour"] == pytest.approx(o["gpus"] * prices[o["gpu"]])
        tokens_per_hour = 30 * 128 * 3600
        assert o["usd_per_million_output_tokens"] == pytest.approx(o["usd_per_hour"] / tokens_per_hour * 1e6)
        assert o["ttft_p95_ms"] <= 1000 and o["itl_p95_ms"] <= 50
        assert o["plan"]["constraints"]["ttft_p95_ms"] == 1000  # the SLOs reached each option's own search
    cheaper_and_faster = [
        (a["gpu"], a["tp"], b["gpu"], b["tp"]) for a in planned for b in planned
        if b["pareto"] and a["usd_per_hour"] <= b["usd_per_hour"] and a["ttft_p95_ms"] < b["ttft_p95_ms"] and a != b
    ]  # fmt: skip
    assert not cheaper_and_faster, "a frontier option is beaten on both cost and TTFT"
    html = tmp_path / "hardware.html"
    assert run_cli("report", str(saved), "--html", str(html)).returncode == 0
    assert "cost-versus-TTFT frontier" in html.read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpu", "h100_sxm,h100_pcie"], "--gpu h100_pcie: aiconfigurator-core has no vllm data"),
        (["--gpu", "h100_sxm,b200_sxm", "--prices", str(PRICES)], "--prices has no price for b200_sxm"),
        (["--gpu", "h100_sxm", "--tp", "1,x"], "--tp: comma-separated whole numbers"),
        ([], "name the GPUs to compare with --gpu"),
        (["--gpu", "h100_sxm", "--engine", "tgi"], "--engine tgi: not one aiconfigurator-core has data for"),
    ],
)
def test_bad_hardware_searches_are_one_line_and_exit_2(args, says):
    done = run_cli("capacity", "--model", EIGHT_B, "--rps", "30", *args, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_model_that_fits_no_option_is_one_line_and_exit_2():
    done = run_cli("capacity", "--model", SEVENTY_B, "--gpu", "l40s", "--tp", "1,2", "--rps", "30", timeout=120)
    assert done.returncode == 2 and "fits none of the options" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_the_search_runs_its_options_as_tasks_on_a_ray_cluster(tmp_path):
    pytest.importorskip("ray")
    saved = tmp_path / "hardware.json"
    with ray_head() as address:
        done = run_cli("capacity", "--model", EIGHT_B, "--gpu", "h100_sxm,l40s", "--tp", "1", *LLM_LOAD,
                       "--ray-address", address, "--save", str(saved), "--quiet", timeout=280, env=RAY_ENV)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    plan = json.loads(saved.read_text())
    assert plan["ran_on"] == f"Ray cluster at {address}"
    planned = {(o["gpu"], o["tp"]): o for o in plan["options"]}
    assert set(planned) == {("h100_sxm", 1), ("l40s", 1)} and all(o["replicas"] for o in planned.values())
    assert planned["h100_sxm", 1]["replicas"] <= planned["l40s", 1]["replicas"]  # the faster GPU needs no more


def test_a_ray_cluster_that_cannot_be_reached_is_one_line():
    pytest.importorskip("ray")
    done = run_cli("capacity", "--model", EIGHT_B, "--gpu", "h100_sxm", "--rps", "30", "--ray-address",
                   f"127.0.0.1:{free_port()}", timeout=60, env=RAY_ENV)  # fmt: skip
    assert done.returncode == 2 and "cannot join the Ray cluster" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
