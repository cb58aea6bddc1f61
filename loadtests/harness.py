"""Running a plan with Locust: in this process, or as a master with local worker processes.

Both use Locust's own runners (library mode). In distributed mode the master sends the
plan to every worker as a Locust message and each worker sends its share's records back
the same way, so a worker needs only the master's address: start N local ones with
``loadtest --workers N``, or more on other machines with ``python -m
infer_plan.loadtests.worker --master-host HOST --master-port PORT``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
import numpy as np
from gevent.event import Event

from ..core.errors import InferPlanError
from ..core.records import RequestRecords
from .locust_user import OpenLoopEnvironment, OpenLoopRun
from .plan import LoadPlan

__all__ = ["PLAN_MESSAGE", "RECORDS_MESSAGE", "locust_summary", "merge_share", "run_plan", "share_message"]

PLAN_MESSAGE, RECORDS_MESSAGE = "infer_plan_plan", "infer_plan_records"
_START_DELAY_S = 1.0
_SHARE_COLUMNS = {"sent": np.float64, "finished": np.float64, "status": np.int32, "outcome": np.int8}

Tick = Callable[[float], None]


def run_plan(
    plan: LoadPlan, *, workers: int = 0, on_tick: Tick | None = None
) -> tuple[RequestRecords, dict[str, dict[str, float]]]:
    """Send the plan; return the exact records and Locust's own per-name stats.

    ``on_tick(seconds into the schedule)`` is called about twice a second (progress bars).
    """
    records = RequestRecords.unanswered(plan.arrivals.times, plan.arrivals.tiers)
    budget = float(plan.arrivals.end_s) + plan.timeout_s + 30.0
    if workers > 0:
        return records, _run_distributed(plan, records, workers, budget, on_tick)
    start_at = time.time() + _START_DELAY_S
    env = OpenLoopEnvironment(host=plan.url, run=OpenLoopRun(plan, records, start_at=start_at))
    done = Event()
    env.events.share_sent.add_listener(lambda **_: done.set())
    runner = env.create_local_runner()
    runner.start(1, spawn_rate=1)
    deadline = time.monotonic() + budget
    while not done.wait(timeout=0.5) and time.monotonic() < deadline:
        if on_tick is not None:
            on_tick(max(0.0, time.time() - start_at))
    runner.quit()
    return records, locust_summary(env)


def share_message(records: RequestRecords, indices: np.ndarray) -> dict[str, Any]:
    """A worker's share of the records as a Locust message (raw bytes: msgpack carries them as they are)."""
    data = {"indices": indices.astype(np.int64).tobytes()}
    for name, dtype in _SHARE_COLUMNS.items():
        data[name] = getattr(records, name)[indices].astype(dtype).tobytes()
    return data


def merge_share(records: RequestRecords, data: dict[str, Any]) -> None:
    indices = np.frombuffer(data["indices"], dtype=np.int64)
    for name, dtype in _SHARE_COLUMNS.items():
        getattr(records, name)[indices] = np.frombuffer(data[name], dtype=dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(
    plan: LoadPlan, records: RequestRecords, workers: int, budget: float, on_tick: Tick | None
) -> dict[str, dict[str, float]]:
    port = _free_port()
    env = OpenLoopEnvironment(host=plan.url)
    runner = env.create_master_runner(master_bind_host="127.0.0.1", master_bind_port=port)
    reported: list[str] = []

    def on_records(environment: object, msg: Any, **_: object) -> None:
        merge_share(records, msg.data)
        reported.append(msg.node_id)

    runner.register_message(RECORDS_MESSAGE, on_records)
    worker_cmd = [sys.executable, "-m", "infer_plan.loadtests.worker", "--master-port", str(port)]
    procs = [subprocess.Popen(worker_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(workers)]
    try:
        deadline = time.monotonic() + 60
        while len(runner.clients.ready) < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise InferPlanError(f"only {len(runner.clients.ready)} of {workers} Locust workers connected")
            gevent.sleep(0.1)
        runner.send_message(PLAN_MESSAGE, {"plan": plan.to_bytes(), "count": workers})  # before the spawn message
        runner.start(workers, spawn_rate=workers)
        started = time.monotonic()
        deadline = started + budget + _START_DELAY_S + 5
        while len(reported) < workers and time.monotonic() < deadline:
            gevent.sleep(0.5)
            if on_tick is not None:
                on_tick(max(0.0, time.monotonic() - started - _START_DELAY_S))
    finally:
        runner.quit()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
    return locust_summary(env)


def locust_summary(env: OpenLoopEnvironment) -> dict[str, dict[str, float]]:
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
