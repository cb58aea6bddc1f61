"""From a sweep's measured knee to a plan (``capacity --from-sweep``) and a corrected profile
(``calibrate --from-sweep``), on sweep results written here so the arithmetic is known."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from infer_plan.calibrate.from_sweep import calibrate_from_sweep, scaled
from infer_plan.cli.options import build_scenario, slo_flags, token_load
from infer_plan.core.schema import SweepResult, SweepStep
from infer_plan.sim.planning.knee import slo_knee_rps
from infer_plan.sim.runner import RunSettings

from tests.helpers import run_cli
from tests.loadtests.test_sweep import PROFILE

KNEE, SATURATION = 40.0, 50.0


def _sweep(tmp_path: Path, *, knee: float = KNEE, workload: dict | None = None, gpus: int = 2) -> Path:
    step = SweepStep(rps=knee, duration_s=4, runs=1, requests=160, achieved_rps=knee, completed_rps=knee,
                     p50_ms=300, p95_ms=420, ttft_p95_ms=180, error_rate=0, reject_rate=0, held=True,
                     decided_by="clear")  # fmt: skip
    result = SweepResult(
        target="http://127.0.0.1:8000", url="http://127.0.0.1:8000", gpus=gpus, outcome="knee", message="knee",
        knee_rps=knee, knee_low_rps=knee, knee_high_rps=knee * 1.04, saturation_rps=SATURATION, probe_requests=100,
        slos={"e2e_p95_ms": 2000, "ttft_p95_ms": 250, "max_error_rate": 0.001, "max_reject_rate": 0.01},
        precision=0.1, step_s=4, longest_step_s=16, warmup_s=1, elapsed_s=60, workload=workload or {}, steps=[step],
    )  # fmt: skip
    path = tmp_path / "sweep.json"
    path.write_text(result.model_dump_json())
    return path


@pytest.mark.parametrize(
    ("rps", "max_load", "replicas", "binding"), [(400, 0.9, 10, "slos"), (400, 0.5, 16, "max_load")]
)
def test_capacity_from_a_sweep_takes_the_larger_of_the_knee_and_the_ceiling(tmp_path, rps, max_load, replicas, binding):
    done = run_cli("capacity", "--from-sweep", str(_sweep(tmp_path)), "--rps", str(rps), "--max-load", str(max_load),
                   "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert replicas == max(math.ceil(rps / KNEE), math.ceil(rps / (SATURATION * max_load)))
    assert plan["gpus"] == 2 * replicas and plan["binding_constraint"].startswith(binding)
    assert plan["p95_ms"] == 420 and plan["ttft_p95_ms"] == 180 and plan["batching"] == "measured"


def test_capacity_from_a_sweep_renders_its_arithmetic(tmp_path):
    done = run_cli("capacity", "--from-sweep", str(_sweep(tmp_path)), "--rps", "400")
    assert done.returncode == 0, done.stderr
    assert "from a measured sweep" in done.stdout and "ceil(400.00 / 40.00) = 10" in done.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rps", "10"], "not found"),
        ([], "give --rps"),
    ],
)
def test_capacity_from_a_missing_sweep_or_without_a_rate_is_one_line(tmp_path, args, says):
    path = tmp_path / "nothing.json" if args else _sweep(tmp_path)
    done = run_cli("capacity", "--from-sweep", str(path), *args)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_a_sweep_that_measured_no_knee_cannot_plan(tmp_path):
    path = _sweep(tmp_path)
    data = json.loads(path.read_text()) | {"knee_rps": None, "outcome": "below_every_rate", "message": "no rate held"}
    path.write_text(json.dumps(data))
    done = run_cli("capacity", "--from-sweep", str(path), "--rps", "10")
    assert done.returncode == 2 and "measured no knee (no rate held)" in done.stderr


def test_calibrate_from_a_sweep_recovers_how_much_slower_the_engine_is(tmp_path):
    """The measured knee is the simulated knee of the profile with every engine time 1.5x: the fit finds 1.5."""
    profile = tmp_path / "engine.toml"
    profile.write_text(PROFILE)
    slos = slo_flags(max_reject_rate=0.01)
    scen = build_scenario(scenario=None, profile=profile, tier_mix=None, slos=slos)
    workload = scen.workload(rps=0.0, tokens=True, **token_load(64, 16, None, None, True))
    settings = RunSettings(duration_s=16, warmup_s=1, replications=10)
    slower = slo_knee_rps(scaled(scen.model, 1.5), workload, 1, settings, resolution=0.01)
    sweep = _sweep(tmp_path, knee=slower, workload=workload.model_dump(mode="json"), gpus=1)
    out = tmp_path / "fixed.toml"
    result = calibrate_from_sweep(sweep, profile, scen.model, out)
    fit = result.knee_fit
    assert fit is not None and abs(fit.simulated_after_rps - slower) <= 0.02 * slower
    assert abs(fit.factor - 1.5) <= 0.06 and fit.simulated_before_rps > slower
    written = tomllib.loads(out.read_text())
    assert written["service"]["decode_step_ms"] == pytest.approx(12.0 * fit.factor, rel=1e-6)
    assert written["service"]["max_num_seqs"] == 16  # limits are left as they were
    assert written["profile"]["corrected_from_sweep"]["factor"] == pytest.approx(fit.factor)
    done = run_cli("simulate", "--profile", str(out), "--rps", "5", "--gpus", "1", "--duration", "5",
                   "--prompt-tokens", "64", "--output-tokens", "16", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr  # the corrected profile plans as any other


def test_calibrate_from_a_sweep_needs_the_profile_it_corrects(tmp_path):
    done = run_cli("calibrate", "--from-sweep", str(_sweep(tmp_path)), "--out", str(tmp_path / "p.toml"))
    assert done.returncode == 2 and "give --profile" in done.stderr
