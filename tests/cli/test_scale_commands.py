"""Planning at scale from the command line: the precision stop, the process pool, requests saved as they settle."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO
from tests.helpers import run_cli as cli

PROFILE = "examples/profiles/llama-3.1-8b-instruct-h100.toml"


def test_capacity_stops_on_precision_and_runs_its_search_in_two_processes():
    done = cli("capacity", "--rps", "3000", "--jobs", "2", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["gpus"] == plan["back_of_envelope"]["gpus_at_ceiling"]  # the load ceiling binds
    assert plan["jobs"] == 2 and plan["simulations"] == len(plan["neighbours"]) == 5
    precision = plan["precision"]
    assert precision["met"] and precision["target"] == 0.01 and precision["measured_s"] == pytest.approx(10.0)
    p95 = precision["intervals"]["p95"]
    assert p95["low_ms"] <= plan["p95_ms"] <= p95["high_ms"]
    assert set(precision["intervals"]) == {"p95", "p95:enterprise", "p95:paid", "p95:free"}
    assert "target met after 10 s" in cli("capacity", "--rps", "3000").stdout


def test_precision_zero_runs_the_whole_duration():
    done = cli("capacity", "--rps", "3000", "--precision", "0", "--duration", "12", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["precision"] is None and plan["duration_s"] == 12


def test_simulate_with_precision_stops_early_and_says_so():
    done = cli("simulate", "--rps", "2000", "--gpus", "3", "--precision", "0.01", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["duration_s"] == pytest.approx(10.0) and result["precision"]["met"]
    assert result["requests"] == pytest.approx(2000 * 10, rel=0.05)


def test_save_requests_writes_every_request_as_a_csv_row(tmp_path):
    rows_file = tmp_path / "requests.csv"
    done = cli(
        "simulate", "--rps", "2000", "--gpus", "3", "--duration", "5", "--warmup", "1", "--json",
        "--save-requests", str(rows_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    with rows_file.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) >= {"scheduled_s", "finished_s", "tier", "outcome"}
    scheduled = np.array([float(r["scheduled_s"]) for r in rows])
    assert np.all(np.diff(scheduled) >= 0)  # in arrival order, each once
    in_window = (scheduled >= 1.0) & (scheduled < 6.0)
    assert int(in_window.sum()) == result["requests"]  # warm-up rows too, but the window's are the result's
    assert {r["outcome"] for r in rows} == {"ok"} and {r["tier"] for r in rows} == {"enterprise", "paid", "free"}
    latency = np.array([float(r["finished_s"]) for r in rows])[in_window] - scheduled[in_window]
    assert np.percentile(latency * 1000, 95) == pytest.approx(result["p95_ms"], rel=0.005)


@pytest.mark.parametrize(
    "args",
    [("capacity", "--rps", "3000", "--precision", "2"), ("capacity", "--rps", "3000", "--jobs", "0"),
     ("simulate", "--rps", "10", "--gpus", "1", "--min-duration", "-1"),
     ("simulate", "--rps", "10", "--gpus", "1", "--save-requests", "/nonexistent/requests.csv")],
)  # fmt: skip
def test_bad_scale_flags_are_one_line_and_exit_2(args):
    done = cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip()


@pytest.mark.parametrize(
    ("args", "batching"),
    [
        (("capacity", "--rps", "1e9"), "static"),
        (("simulate", "--rps", "1e8", "--gpus", "10", "--duration", "5"), "static"),
        (("simulate", "--profile", PROFILE, "--rps", "1e8", "--gpus", "10", "--duration", "5"), "continuous"),
    ],
)
def test_absurd_sizes_are_refused_in_one_line_before_any_work(args, batching):
    """What no run can hold is said at once (exit 2, well within 30 s), with the limit and the way out."""
    done = cli(*args, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("infer-plan: error: --rps: ")
    assert f"more than one {batching} run holds" in message and "--duration" in message


@pytest.mark.parametrize("rps", ["1e6", "1e9"])
def test_continuous_batching_plans_at_internet_scale_from_a_sample_of_its_gpus(rps):
    """A million requests a second (and a billion) on the example LLM profile: answered, bound by the load ceiling,
    each run two dozen GPUs at their share, in bounded memory (the largest process, workers included)."""
    done = cli("capacity", "--profile", PROFILE, "--rps", rps, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["gpus"] == plan["back_of_envelope"]["gpus_at_ceiling"] > 10_000
    assert plan["binding_constraint"] == "load ceiling" and plan["simulated_gpus"] == 24
    assert plan["ttft_p95_ms"] < 500 and plan["itl_p95_ms"] < 50
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024  # KiB on Linux: 2 GiB


def test_a_worker_that_dies_is_one_line():
    """The OS kills a simulation worker mid-search (as the out-of-memory killer would): one line, exit 2."""
    argv = [sys.executable, "-m", "infer_plan.cli", "capacity", "--rps", "20000", "--jobs", "2", "--precision", "0"]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            workers = _children(proc.pid, deadline=time.monotonic() + 60)
            os.kill(workers[0], signal.SIGKILL)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "worker process died" in err and len(err.strip().splitlines()) == 1


def _children(pid: int, deadline: float) -> list[int]:
    """The process's children once it has started some (Linux /proc), within the deadline."""
    while time.monotonic() < deadline:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
                found += [int(c) for c in (task / "children").read_text().split()]
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("capacity started no worker process")
