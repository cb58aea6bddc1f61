"""Running a plan with Locust: in this process, or as a master with local worker processes.

Both use Locust's own runners (library mode). Distributed mode starts N worker
processes of :mod:`infer_plan.loadtests.worker` that connect to a master bound to
127.0.0.1; to spread workers over machines, run the same worker module elsewhere with
``--master-host`` pointing at the master (see the README).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gevent
from gevent.event import Event
from locust.env import Environment

from ..sim.errors import InferPlanError
from .locust_user import OpenLoopUser
from .plan import LoadPlan, Records

__all__ = ["locust_summary", "run_plan"]

_START_DELAY_S = 1.0


def _configure(plan: LoadPlan, records: Records, share_count: int, start_at: float) -> Event:
    done = Event()
    OpenLoopUser.plan, OpenLoopUser.records = plan, records
    OpenLoopUser.share_count, OpenLoopUser.start_at, OpenLoopUser.done = share_count, start_at, done
    return done


Tick = Callable[[float], None]


def run_plan(
    plan: LoadPlan, *, workers: int = 0, on_tick: Tick | None = None
) -> tuple[Records, dict[str, dict[str, float]]]:
    """Send the plan; return exact records and Locust's own per-name stats.

    ``on_tick(seconds into the schedule)`` is called about twice a second (progress bars).
    """
    records = Records.empty(plan)
    budget = float(plan.arrivals.end_s) + plan.timeout_s + 30.0
    if workers <= 0:
        start_at = time.time() + _START_DELAY_S
        done = _configure(plan, records, 1, start_at)
        env = Environment(user_classes=[OpenLoopUser], host=plan.url)
        runner = env.create_local_runner()
        runner.start(1, spawn_rate=1)
        deadline = time.monotonic() + budget
        while not done.wait(timeout=0.5) and time.monotonic() < deadline:
            if on_tick is not None:
                on_tick(max(0.0, time.time() - start_at))
        runner.quit()
        return records, locust_summary(env)
    return _run_distributed(plan, records, workers, budget, on_tick)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(plan: LoadPlan, records: Records, workers: int, budget: float, on_tick: Tick | None):
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="infer-plan-locust-") as tmp:
        out = Path(tmp)
        plan_file = out / "plan.npz"
        plan.save(plan_file)
        env = Environment(user_classes=[OpenLoopUser], host=plan.url)
        runner = env.create_master_runner(master_bind_host="127.0.0.1", master_bind_port=port)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "infer_plan.loadtests.worker",
                    "--master-host",
                    "127.0.0.1",
                    "--master-port",
                    str(port),
                    "--plan",
                    str(plan_file),
                    "--out",
                    str(out),
                    "--workers",
                    str(workers),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for _ in range(workers)
        ]
        try:
            deadline = time.monotonic() + 60
            while len(runner.clients.ready) < workers:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise InferPlanError(f"only {len(runner.clients.ready)} of {workers} Locust workers connected")
                gevent.sleep(0.1)
            runner.start(workers, spawn_rate=workers)
            started = time.monotonic()
            deadline = started + budget + _START_DELAY_S + 5
            while len(list(out.glob("records-*.npz"))) < workers and time.monotonic() < deadline:
                gevent.sleep(0.5)
                if on_tick is not None:
                    on_tick(max(0.0, time.monotonic() - started - _START_DELAY_S))
            for path in out.glob("records-*.npz"):
                records.merge_file(path)
        finally:
            runner.quit()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return records, locust_summary(env)


def locust_summary(env: Environment) -> dict[str, dict[str, float]]:
    """Locust's view (bucketed percentiles, from the actual send time), per request name."""
    summary = {}
    for entry in [*env.stats.entries.values(), env.stats.total]:
        if entry.num_requests == 0:
            continue
        summary[entry.name] = {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95),
            "rps": entry.total_rps,
        }
    return summary
