"""The objectives held once (``Slos`` on the service model) and checked by one function for plans and load tests."""

from __future__ import annotations

import numpy as np
import pytest
from infer_plan.core import ServiceModel
from infer_plan.core.schema import LatencyStats, TokenStats
from infer_plan.core.slos import Observed, Scope, Slos, check_slos, good_requests
from infer_plan.sim import RunSettings, Workload
from infer_plan.sim.planning.planner import failures
from infer_plan.sim.runner import run_simulation
from infer_plan.sim.scenario import load_scenario


def test_flat_keys_nested_table_and_flags_land_in_one_object(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[service]\nslo_ttft_p95_ms = 800\n[service.slos]\ne2e_p95_ms = 300\nmax_reject_rate = 0.05\n")
    model = load_scenario(path).model
    assert model.slos == Slos(e2e_p95_ms=300, ttft_p95_ms=800, max_reject_rate=0.05)
    # Flags come last, flat or nested, and leave what they do not name.
    flagged = load_scenario(path, service_overrides={"slo_p95_ms": 200, "slos": {"min_goodput_rps": 5.0}}).model
    assert flagged.slos == Slos(e2e_p95_ms=200, ttft_p95_ms=800, max_reject_rate=0.05, min_goodput_rps=5.0)
    assert ServiceModel(slo_itl_p95_ms=40).slos.itl_p95_ms == 40


def scope(name: str, p95: float | None, ttft: float | None = None, requests: int = 10) -> Scope:
    return Scope(name, LatencyStats(p95_ms=p95), TokenStats(ttft_p95_ms=ttft, goodput_rps=3.0), requests)


def test_each_objective_is_a_gate_per_scope_and_an_unmeasured_figure_fails():
    slos = Slos(e2e_p95_ms=100, ttft_p95_ms=50, tier_e2e_p95_ms={"free": 400}, min_goodput_rps=4)
    seen = Observed(
        [scope("overall", 90, 40), scope("enterprise", 99, None), scope("free", 350, 45), scope("paid", None, None, 0)],
        error_rate=0.0, reject_rate=0.02,
    )  # fmt: skip
    gates = {g.name: g for g in check_slos(slos, seen)}
    assert [n for n, g in gates.items() if not g.passed] == ["ttft_p95_enterprise", "reject_rate", "goodput"]
    assert gates["p95_free"].limit == 400 and "not measured" in gates["ttft_p95_enterprise"].detail
    assert "p95_paid" not in gates  # a tier without answers is not held
    only_overall = check_slos(slos.model_copy(update={"hold_tiers": False}), seen)
    assert {g.name for g in only_overall} == {"p95_overall", "ttft_p95_overall", "error_rate", "reject_rate", "goodput"}


def test_goodput_counts_requests_within_each_of_their_own_thresholds():
    slos = Slos(e2e_p95_ms=1000, ttft_p95_ms=200, tpot_p95_ms=50)
    e2e = np.array([900.0, 900.0, 1100.0, 300.0, 250.0])
    ttft = np.array([100.0, 300.0, 100.0, 100.0, 250.0])
    tokens = np.array([17, 17, 17, 3, 1])  # TPOT 50, 37.5, 62.5, 100 (over), none (one token)
    assert good_requests(slos, e2e, ttft, tokens).tolist() == [True, False, False, False, False]
    assert good_requests(slos, e2e, None, None).tolist() == [True, True, False, True, True]  # not streamed: E2E


def test_the_planner_reads_a_simulation_through_the_same_check():
    model = ServiceModel(slo_p95_ms=140, max_load=1.0)
    result = run_simulation(model, Workload.constant(2_000), RunSettings(duration_s=5, warmup_s=1), gpus=4)
    assert result.p95_ms > 140  # light load: a batch waits out its 40 ms assembly
    assert "p95_overall" in failures(model, result)
    relaxed = model.model_copy(update={"slos": Slos(e2e_p95_ms=1000)})
    assert failures(relaxed, result) == []
    assert failures(relaxed.model_copy(update={"max_load": 0.01}), result) == ["load"]


@pytest.mark.parametrize(
    "bad",
    [{"slo_p95_ms": -1}, {"slos": {"ttft_p95_ms": 0}}, {"slos": {"nope": 1}},
     {"slos": {"tier_e2e_p95_ms": {"gold": 1}}}, {"slos": {"tier_e2e_p95_ms": {"free": 0}}}],
)  # fmt: skip
def test_a_bad_objective_is_a_validation_error(bad):
    with pytest.raises(ValueError):
        ServiceModel(**bad)
