"""``loadtest --sweep``: the search on a synthetic target, then real sweeps of a real server process."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from infer_plan.core.schema import SweepStep
from infer_plan.loadtests import sweep as sweep_module
from infer_plan.loadtests.sweep_step import _growing, p95_interval

from tests.helpers import REPO, run_cli, running_server

pytestmark = pytest.mark.timeout(400)

# A small continuous engine on the sim backend, slow enough that its knee (~45 req/s) is a load
# two cores drive without the generator's own work showing in the latencies.
PROFILE = """
[service]
batching = "continuous"
pcie_in_ms = 0.0
kernel_ms = 0.0
pcie_out_ms = 0.0
decode_step_ms = 12.0
prefill_ms_per_token = 0.1
decode_ms_per_seq = 0.4
max_num_seqs = 16
max_batched_tokens = 2048
kv_cache_tokens = 100000
slo_ttft_p95_ms = 250
slo_p95_ms = 2000
"""
# One tier: a sweep holds each tier to its SLOs, and a tier of a handful of requests per step makes a noisy P95.
LOAD = ["--api", "completions", "--stream", "--prompt-tokens", "64", "--output-tokens", "16", "--warmup", "1",
        "--tier-mix", "paid=1"]  # fmt: skip


@pytest.fixture()
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(PROFILE)
    return path


# -- the judgement of one step --------------------------------------------------------------------------


def test_a_p95_interval_narrows_as_requests_grow_and_holds_the_true_value():
    rng = np.random.default_rng(3)
    true_p95 = -np.log(0.05) * 100.0  # exponential, mean 100 ms
    few, many = rng.exponential(100.0, 400), rng.exponential(100.0, 40_000)
    _, low_few, high_few = p95_interval(few)
    value, low, high = p95_interval(many)
    assert low <= true_p95 <= high and abs(value - true_p95) / true_p95 < 0.03
    assert (high - low) < (high_few - low_few) / 4  # a hundred times the requests, about a tenth the width


def test_a_handful_of_requests_is_judged_by_its_whole_range():
    assert p95_interval(np.array([10.0, 30.0, 20.0]))[1:] == (10.0, 30.0)


def test_a_queue_building_up_through_a_step_is_seen_as_growing():
    rng = np.random.default_rng(0)
    steady = 100 + rng.normal(0, 5, 300)
    assert not _growing(steady, limit=150)
    assert _growing(np.linspace(100, 900, 300), limit=500)
    assert not _growing(np.linspace(100, 400, 300), limit=500)  # growing, but its last third still held


# -- the search, against a target that holds every rate up to a known knee ------------------------------


class _Synthetic(sweep_module._Search):
    """Holds every rate up to ``knee``; answers ``saturation`` per second to the probe; no HTTP."""

    def __init__(self, spec, knee: float, saturation: float, budget_steps: int = 100) -> None:
        super().__init__(spec, "http://127.0.0.1:9", lambda _: None)
        self.knee, self.sat, self.budget_steps = knee, saturation, budget_steps

    def probe(self) -> float:
        self.saturation = self.sat
        return self.sat

    def affords(self, seconds: float) -> bool:
        return len(self.steps) < self.budget_steps

    def step(self, rps: float) -> SweepStep | None:
        if not self.affords(1.0):
            return None
        held = rps <= self.knee
        step = SweepStep(rps=rps, duration_s=1, runs=1, requests=10, achieved_rps=rps, completed_rps=rps,
                         p50_ms=1, p95_ms=1, error_rate=0, reject_rate=0, held=held,
                         failed=[] if held else ["p95_overall"], decided_by="clear")  # fmt: skip
        self.steps.append(step)
        return step


def _spec(**kw) -> sweep_module.SweepSpec:
    """A sweep of the default service with no lowest rate given (the search picks it)."""
    from infer_plan.core.model import ServiceModel
    from infer_plan.loadtests.spec import LoadTestSpec
    from infer_plan.sim.inputs.workload import Workload

    base = LoadTestSpec(target="sim", model=ServiceModel(), workload=Workload.constant(1.0).at_rate(0.0), duration_s=5)
    return sweep_module.SweepSpec(base, **kw)


@pytest.mark.parametrize("knee", [3.0, 37.0, 52.0])
def test_the_search_brackets_the_knee_within_its_resolution(knee):
    search = _Synthetic(_spec(), knee=knee, saturation=50.0)
    outcome, message = sweep_module._search(search)
    held, failed = sweep_module._bracket(search.steps)
    assert outcome == "knee", message
    assert held <= knee < failed and failed - held <= 0.05 * held
    assert len(search.steps) <= 12


def test_a_target_holding_no_rate_says_so_after_halving_the_lowest_rate():
    search = _Synthetic(_spec(), knee=0.01, saturation=50.0)
    assert sweep_module._search(search)[0] == "below_every_rate"
    assert len(search.steps) == sweep_module.LOW_HALVINGS + 1


def test_a_target_holding_max_rps_was_not_saturated():
    search = _Synthetic(_spec(max_rps=20.0), knee=1000.0, saturation=50.0)
    outcome, message = sweep_module._search(search)
    assert outcome == "not_saturated" and "at least 20.00" in message
    assert max(s.rps for s in search.steps) == 20.0


def test_the_budget_ends_the_search_with_the_interval_so_far():
    search = _Synthetic(_spec(), knee=37.0, saturation=50.0, budget_steps=3)
    outcome, message = sweep_module._search(search)
    held, failed = sweep_module._bracket(search.steps)
    assert outcome == "budget" and f"[{held:,.2f}, {failed:,.2f})" in message


def test_listed_rates_run_in_order_until_one_fails():
    search = _Synthetic(_spec(rates=(40.0, 10.0, 20.0, 30.0)), knee=25.0, saturation=50.0)
    outcome, _ = sweep_module._search(search)
    assert [s.rps for s in search.steps] == [10.0, 20.0, 30.0] and outcome == "knee"


# -- real sweeps of a real server ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_measured_knee_of_a_sim_server_is_the_simulators(profile, tmp_path):
    out = tmp_path / "sweep.json"
    done = run_cli("loadtest", "--target", "sim", "--sweep", "--profile", str(profile), *LOAD, "--duration", "4",
                   "--json", str(out), "--junit", str(tmp_path / "j.xml"), "--html", str(tmp_path / "s.html"),
                   "--min-knee-rps", "5", timeout=380)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["kind"] == "sweep" and data["outcome"] == "knee", data["message"]
    knee, simulated = data["knee_rps"], data["simulated_knee_rps"]
    # Measured and simulated knees of the same engine: HTTP and the generator add a few ms to a ~250 ms
    # TTFT P95, and each is found to 5% (measured) and 2% (simulated).
    assert abs(knee - simulated) / simulated <= 0.10, (knee, simulated, data["steps"])
    assert data["knee_low_rps"] == knee < data["knee_high_rps"] <= 1.05 * knee + 1e-9
    held = [s for s in data["steps"] if s["held"]]
    assert all(s["ttft_p95_ms"] <= 250 for s in held) and all(not s["held"] for s in data["steps"] if s["rps"] > knee)
    cases = {c.get("name") for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")}
    assert cases == {"knee", "min_knee_rps"}
    assert "knee measured" in (tmp_path / "s.html").read_text()
    # From the measured knee to a fleet, and to a profile: one that thinks the engine twice as fast as it is
    # is slowed back by about 2 (the measured and simulated knees agree to 10%, so the factor to ~10%).
    plan = run_cli("capacity", "--from-sweep", str(out), "--rps", "200", "--max-load", "1", "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["gpus"] == math.ceil(200 / knee - 1e-9), plan.stderr
    fast = tmp_path / "fast.toml"
    fast.write_text(PROFILE.replace("12.0", "6.0").replace("0.1\n", "0.05\n").replace("0.4", "0.2"))
    fixed = run_cli("calibrate", "--from-sweep", str(out), "--profile", str(fast), "--out", str(tmp_path / "p.toml"),
                    "--json")  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    factor = json.loads(fixed.stdout)["knee_fit"]["factor"]
    assert 1.75 <= factor <= 2.3, factor


def _sim_sweep(profile: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """A sweep of a sim-backend server serving ``profile``: the process and the result it wrote."""
    done = run_cli("loadtest", "--target", "sim", "--sweep", "--profile", str(profile), *LOAD, *args,
                   "--json", str(out), timeout=200)  # fmt: skip
    return done, json.loads(out.read_text())


@pytest.mark.slow  # a sweep of a real server (10-20 s); the quick suite keeps its plans
def test_a_target_that_fails_every_rate_exits_1_with_its_steps(profile, tmp_path):
    done, data = _sim_sweep(profile, tmp_path / "sweep.json", "--duration", "1", "--slo-ttft-p95-ms", "1")
    assert done.returncode == 1, done.stderr[-2000:]
    assert data["outcome"] == "below_every_rate" and data["knee_rps"] is None
    assert len(data["steps"]) == sweep_module.LOW_HALVINGS + 1 and not any(s["held"] for s in data["steps"])
    assert "no rate held every SLO set" in done.stdout


@pytest.mark.slow  # a sweep of a real server (10-20 s); the quick suite keeps its plans
def test_a_target_that_holds_max_rps_is_reported_not_saturated(profile, tmp_path):
    done, data = _sim_sweep(profile, tmp_path / "sweep.json", "--duration", "2", "--max-rps", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    assert data["outcome"] == "not_saturated" and data["knee_rps"] == 6.0 and data["knee_high_rps"] is None


def _sweep_until(args: list[str], line_prefix: str, act, *, again: bool = False) -> tuple[subprocess.Popen, str]:
    """Start a sweep, call ``act(proc)`` when its progress shows ``line_prefix``; its exit code and stdout.

    ``again``: act again at each later step the sweep announces, as a user presses Ctrl-C again (a full
    suite's run once saw a sweep carry on after the SIGINT sent at its third step; alone it never did).
    """
    proc = subprocess.Popen([sys.executable, "-m", "infer_plan.cli", "loadtest", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stderr is not None
        acted = False
        for line in proc.stderr:
            if line.startswith(line_prefix) or (acted and again and line.startswith("step ")):
                act(proc)
                acted = True
                if not again:
                    break
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out


@pytest.mark.slow  # a sweep of a real server (10-20 s); the quick suite keeps its plans
def test_ctrl_c_keeps_the_steps_done_and_exits_130(profile, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["--target", "sim", "--sweep", "--profile", str(profile), *LOAD, "--duration", "2", "--json", str(out)]
    proc, _ = _sweep_until(args, "step 3", lambda p: p.send_signal(signal.SIGINT), again=True)
    assert proc.returncode == 130
    data = json.loads(out.read_text())
    assert data["outcome"] == "interrupted" and len(data["steps"]) >= 2  # the steps done before the Ctrl-C


@pytest.mark.slow  # a sweep of a real server (10-20 s); the quick suite keeps its plans
def test_a_target_that_dies_mid_sweep_is_one_line_and_exit_3(tmp_path):
    out = tmp_path / "sweep.json"
    with running_server("--backend", "sim", "--gpus", "1") as server:
        args = ["--target", server.url, "--sweep", "--rates", "20,40,60,80", "--duration", "2", "--warmup", "0.5",
                "--json", str(out)]  # fmt: skip
        proc, stdout = _sweep_until(args, "step 2", lambda _: server.terminate())
    assert proc.returncode == 3, stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["outcome"] == "target_failed" and len(data["steps"]) >= 1 and data["steps"][0]["held"]
    assert "the target stopped answering" in data["message"] and "Traceback" not in stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rates", "5,x"], "--rates takes numbers"),
        (["--rates", "5,50", "--max-rps", "20"], "a rate above --max-rps"),
        (["--spike", "2:5:3"], "a sweep offers steady rates"),
        (["--workers", "2"], "drop --workers"),
    ],
)
def test_bad_sweep_flags_are_one_line_and_exit_2(args, says):
    done = run_cli("loadtest", "--target", "sim", "--sweep", *args, timeout=60)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_load_test_without_a_rate_asks_for_one():
    done = run_cli("loadtest", "--target", "sim", "--duration", "1", timeout=60)
    assert done.returncode == 2 and "give --rps and --duration" in done.stderr
