"""Replaying trace files: the forms the README promises, and errors that name the line and what was expected."""

from pathlib import Path

import numpy as np
import pytest
from infer_plan.core import ConfigError, ServiceModel, Tier, UsageError
from infer_plan.sim import RunSettings, Workload, run_simulation
from infer_plan.sim.inputs.arrivals import load_trace
from infer_plan.sim.inputs.schedule import RateSchedule

from tests.helpers import REPO, run_cli


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("headerless.csv", "0.000144,enterprise\n0.5,free\n0.25,paid\n"),
        ("header.csv", "timestamp,tier\n0.000144,enterprise\n0.5,free\n0.25,paid\n"),
        ("short-header.csv", "tier,t\nenterprise,0.000144\nfree,0.5\npaid,0.25\n"),
        (
            "rows.jsonl",
            '{"timestamp": 0.000144, "tier": "enterprise"}\n{"t": 0.5, "tier": "free"}\n{"t": 0.25, "tier": "paid"}\n',
        ),
    ],
)
def test_every_trace_form_reads_the_same_requests(tmp_path, name, text):
    arrivals = load_trace(write(tmp_path, name, text))
    np.testing.assert_allclose(arrivals.times, [0.0, 0.25 - 0.000144, 0.5 - 0.000144])  # sorted, shifted to 0
    assert arrivals.tiers.tolist() == [Tier.ENTERPRISE, Tier.PAID, Tier.FREE]


def test_a_row_without_a_tier_is_free_traffic(tmp_path):
    assert load_trace(write(tmp_path, "t.csv", "1.0\n2.0,paid\n3.0\n")).tiers.tolist() == [2, 1, 2]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("a.csv", "0.1,free\nsoon,paid\n", "a.csv:2: expected a timestamp in seconds, got 'soon'"),
        ("b.csv", "when,who\n1,free\n", "b.csv:1: expected seconds in the first column, or a header naming"),
        ("c.csv", "0.1,gold\n", "c.csv:1: unknown tier 'gold'"),
        ("d.jsonl", '{"t": 1}\n[1, 2]\n', 'd.jsonl:2: expected an object like {"timestamp": 1.5'),
        ("e.jsonl", '{"t": 1}\n{"t": \n', "e.jsonl:2: not a JSON object"),
        ("f.csv", "0.1,free\ninf,free\n", "f.csv:2: expected a finite timestamp"),
        ("g.csv", "\n\n", "the trace holds no requests"),
    ],
)
def test_bad_traces_name_the_line_and_what_was_expected(tmp_path, name, text, needle):
    with pytest.raises(ConfigError) as err:
        load_trace(write(tmp_path, name, text))
    assert needle in str(err.value)


def test_a_trace_shorter_than_the_default_warmup_is_its_own_window(tmp_path):
    trace = write(tmp_path, "short.csv", "".join(f"{i * 0.01:.2f},paid\n" for i in range(300)))  # 3 s < 10 s
    result = run_simulation(ServiceModel(), Workload(schedule=RateSchedule(rps=0), trace=trace), RunSettings(), gpus=1)
    assert result.warmup_s == 0 and result.requests == 300  # every request counts
    assert result.duration_s == pytest.approx(3.0)  # 2.99 s plus one mean gap
    with pytest.raises(UsageError, match="not longer than the warm-up of 5 s") as err:
        run_simulation(
            ServiceModel(), Workload(schedule=RateSchedule(rps=0), trace=trace), RunSettings(warmup_s=5), gpus=1
        )
    assert err.value.field == "warmup_s"


def test_the_example_trace_replays_as_the_readme_shows():
    done = run_cli("simulate", "--trace", str(REPO / "examples" / "trace.csv"), "--gpus", "1", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"requests": 2978' in done.stdout and '"warmup_s": 0.0' in done.stdout
    bad = run_cli("simulate", "--trace", str(REPO / "examples" / "trace.csv"), "--gpus", "1", "--warmup", "60")
    assert bad.returncode == 2 and "--warmup: the trace lasts" in bad.stderr and "Traceback" not in bad.stderr
