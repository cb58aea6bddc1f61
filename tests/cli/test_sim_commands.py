"""The simulate and capacity commands as a user runs them: a real process, real exit codes."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "infer_plan.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_capacity_10k_json_answers_16_gpus_with_its_arithmetic():
    proc = run("capacity", "--rps", "10000", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["gpus"] == 16
    assert round(data["load_factor"], 2) == 0.69
    assert data["p95_ms"] < 500
    for key in ("rps", "gpu_busy", "back_of_envelope"):
        assert key in data
    env = data["back_of_envelope"]
    assert env["gpus_at_ceiling"] == 16 and env["raw_gpus"] == pytest.approx(11.0)


def test_capacity_no_overlap_shows_the_design_numbers():
    proc = run("capacity", "--rps", "10000", "--no-overlap", "--json", "--duration", "20")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)["back_of_envelope"]
    assert round(env["per_gpu_rps"]) == 667
    assert env["raw_gpus"] == pytest.approx(15.0)
    assert env["gpus_at_ceiling"] == 22


def test_simulate_json_has_the_required_keys():
    proc = run("simulate", "--rps", "500", "--gpus", "1", "--duration", "10", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in (
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "throughput_rps",
        "rejected_fraction",
        "load_factor",
        "gpu_busy",
        "mean_batch_size",
        "per_tier",
    ):
        assert key in data
    assert set(data["per_tier"]) == {"enterprise", "paid", "free"}
    for stats in data["per_tier"].values():
        assert {"p50_ms", "p95_ms", "p99_ms", "rejected_fraction"} <= set(stats)


def test_simulate_table_output_and_scenario_file(tmp_path):
    scenario = tmp_path / "spike.toml"
    scenario.write_text(
        "[service]\ngpus = 2\n[service.tiers]\nenterprise = 0.2\npaid = 0.3\nfree = 0.5\n"
        "[load]\nrps = 800\n[[load.segments]]\nkind = 'spike'\nat_s = 5\nduration_s = 5\nfactor = 3\n"
        "[run]\nduration_s = 15\nwarmup_s = 1\n"
    )
    proc = run("simulate", "--scenario", str(scenario))
    assert proc.returncode == 0, proc.stderr
    assert "enterprise" in proc.stdout and "load_factor" in proc.stdout
    # The spike doubles the mean offered rate over the window's third (800 -> 1333 avg).
    data = json.loads(run("simulate", "--scenario", str(scenario), "--json").stdout)
    assert data["offered_rps"] == pytest.approx(800 * (10 + 15) / 15, rel=0.1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--rps", "-5", "--gpus", "1"], "--rps"),
        (["simulate", "--rps", "abc", "--gpus", "1"], "--rps"),
        (["simulate", "--rps", "100", "--gpus", "0"], "--gpus"),
        (["simulate", "--rps", "100"], "--gpus"),
        (["simulate", "--rps", "100", "--gpus", "1", "--tier-mix", "enterprise=0.5,paid=0.3"], "sum to 1"),
        (["simulate", "--rps", "100", "--gpus", "1", "--tier-mix", "gold=1"], "unknown tier"),
        (["simulate", "--rps", "100", "--gpus", "1", "--spike", "3:1"], "--spike"),
        (["simulate", "--rps", "100", "--gpus", "1", "--trace", "/nonexistent.csv"], "not found"),
        (["capacity", "--rps", "0"], "--rps"),
        (["capacity", "--rps", "100", "--max-load", "1.5"], "--max-load"),
        (["capacity", "--rps", "100", "--scenario", "/nonexistent.toml"], "not found"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = run(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    if needle:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[service]\nmax_bacth = 100\n", "unknown key 'max_bacth'"),
        ("[service]\nmax_batch = -1\n", "max_batch"),
        ("[service\n", "invalid TOML"),
        ("[servce]\n", "unknown table"),
        ("[service.backpressure]\nyellow = 0.9\nred = 0.5\n", "yellow <= red"),
        ("[load]\nrps = 10\n[[load.segments]]\nkind = 'wave'\n", "load"),
    ],
)
def test_bad_scenario_files_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    proc = run("simulate", "--rps", "100", "--gpus", "1", "--scenario", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_trace_replay(tmp_path):
    trace = tmp_path / "trace.csv"
    rows = ["timestamp,tier"] + [
        f"{1700000000 + i * 0.01:.3f},{'enterprise' if i % 10 == 0 else 'free'}" for i in range(2000)
    ]
    trace.write_text("\n".join(rows))
    proc = run("simulate", "--trace", str(trace), "--gpus", "1", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["per_tier"]["enterprise"]["requests"] == pytest.approx(190, abs=2)
    assert data["offered_rps"] == pytest.approx(100, rel=0.02)


def test_capacity_impossible_constraint_exits_1():
    proc = run("capacity", "--rps", "1000", "--slo-p95-ms", "50", "--max-gpus", "4", "--duration", "5")
    assert proc.returncode == 1
    assert "No GPU count" in proc.stdout


def test_autoscale_prints_its_decisions_and_the_cold_start():
    proc = run("simulate", "--rps", "5000", "--gpus", "8", "--spike", "1.5:60:900", "--autoscale", "--duration", "1200")
    assert proc.returncode == 0, proc.stderr
    assert "autoscaler" in proc.stdout and "Autoscaler decisions" in proc.stdout
    data = json.loads(
        run(
            "simulate", "--rps", "5000", "--gpus", "8", "--spike", "1.5:60:900", "--autoscale", "--duration", "1200",
            "--json",
        ).stdout
    )  # fmt: skip
    events = data["autoscale"]["events"]
    ordered = [e["t_s"] for e in events if e["action"] == "ordered"]
    serving = [e["t_s"] for e in events if e["action"] == "serving"]
    # Load above 80% from the spike at 60 s; the policy waits 120 s, then each GPU cold-starts 300 s.
    assert 60 + 120 <= ordered[0] <= 60 + 120 + 10
    assert serving == pytest.approx([t + 300 for t in ordered])
    assert data["autoscale"]["peak_gpus"] == 8 + len(ordered)


def test_autoscale_that_never_fires_says_why():
    proc = run("simulate", "--rps", "5000", "--gpus", "8", "--spike", "3:120:60", "--autoscale", "--duration", "300")
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert "no change: the load stayed above 80% for" in flat and "the policy waits 120 s" in flat
