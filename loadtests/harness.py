"""Running a plan with Locust: in this process, or as a master with local worker processes.

Both use Locust's own runners (library mode). In distributed mode the master sends the
plan to every worker as a Locust message and each worker sends its share's records back
the same way, so a worker needs only the master's address: start N local ones with
``loadtest --workers N``, or more on other machines with ``python -m
infer_plan.loadtests.worker --master-host HOST --master-port PORT``.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import numpy as np
from gevent.event import Event

from ..core.errors import InferPlanError
from ..core.records import RequestRecords
from .locust_user import OpenLoopEnvironment, OpenLoopRun
from .plan import LoadPlan
from .token_log import TokenLog

__all__ = [
    "PLAN_MESSAGE",
    "RECORDS_MESSAGE",
    "Sent",
    "locust_failures",
    "locust_summary",
    "merge_share",
    "run_plan",
    "schedule_start",
    "share_message",
]

PLAN_MESSAGE, RECORDS_MESSAGE = "infer_plan_plan", "infer_plan_records"
_START_DELAY_S = 1.0
_SHARE_COLUMNS = {
    "scheduled": np.float64,  # a session's later turn is due when the turn before ended
    "sent": np.float64,
    "finished": np.float64,
    "status": np.int32,
    "outcome": np.int8,
    "first_token": np.float64,
    "prompt_tokens": np.int32,
    "output_tokens": np.int32,
    "cached_tokens": np.int64,
}

Tick = Callable[[float], None]


@dataclass
class Sent:
    """What sending a plan produced: the exact records, the token log (token APIs), Locust's own stats."""

    records: RequestRecords
    tokens: TokenLog | None
    locust: dict[str, dict[str, float]]
    failures: dict[str, int]


def schedule_start(align_s: float | None = None) -> float:
    """``time.time()`` of a schedule's time 0: a moment from now, on a multiple of ``align_s`` when given.

    An autoscaling server ticks on wall-clock multiples of its tick; a schedule that starts on
    one sees the ticks the simulator has for it (ticks from time 0), so both decide alike.
    """
    start = time.time() + _START_DELAY_S
    return math.ceil(start / align_s) * align_s if align_s else start


def run_plan(plan: LoadPlan, *, workers: int = 0, on_tick: Tick | None = None, start_at: float | None = None) -> Sent:
    """Send the plan; return the exact records and Locust's own per-name stats.

    ``on_tick(seconds into the schedule)`` is called about twice a second (progress bars).
    ``start_at``: the schedule's time 0 (:func:`schedule_start`) for the one-process generator;
    Locust workers (``workers`` > 0) start theirs once they have all connected.
    """
    last = plan.until_s if plan.sessions is not None else plan.arrivals.end_s  # a session's turn until the end
    budget = float(last) + plan.timeout_s + 30.0
    if workers > 0:
        run = OpenLoopRun.of(plan)
        env = _run_distributed(plan, run, workers, budget, on_tick)
        return Sent(run.records, run.tokens, locust_summary(env), locust_failures(env))
    start_at = start_at if start_at is not None else schedule_start()
    run = OpenLoopRun.of(plan, start_at=start_at)
    env = OpenLoopEnvironment(host=plan.url, run=run)
    done = Event()
    env.events.share_sent.add_listener(lambda **_: done.set())
    runner = env.create_local_runner()
    runner.start(1, spawn_rate=1)
    deadline = time.monotonic() + budget
    while not done.wait(timeout=0.5) and time.monotonic() < deadline:
        if on_tick is not None:
            on_tick(max(0.0, time.time() - start_at))
    runner.quit()
    return Sent(run.records, run.tokens, locust_summary(env), locust_failures(env))


def share_message(run: OpenLoopRun, indices: np.ndarray) -> dict[str, Any]:
    """A worker's share of the records as a Locust message (raw bytes: msgpack carries them as they are)."""
    data = {"indices": indices.astype(np.int64).tobytes()}
    for name, dtype in _SHARE_COLUMNS.items():
        column = getattr(run.records, name)
        if column is not None:
            data[name] = column[indices].astype(dtype).tobytes()
    if run.tokens is not None:
        data |= run.tokens.message(indices)
    return data


def merge_share(run: OpenLoopRun, data: dict[str, Any]) -> None:
    indices = np.frombuffer(data["indices"], dtype=np.int64)
    for name, dtype in _SHARE_COLUMNS.items():
        if name in data:
            getattr(run.records, name)[indices] = np.frombuffer(data[name], dtype=dtype)
    if run.tokens is not None:
        run.tokens.merge(indices, data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_distributed(
    plan: LoadPlan, run: OpenLoopRun, workers: int, budget: float, on_tick: Tick | None
) -> OpenLoopEnvironment:
    port = _free_port()
    env = OpenLoopEnvironment(host=plan.url)
    runner = env.create_master_runner(master_bind_host="127.0.0.1", master_bind_port=port)
    reported: list[str] = []

    def on_records(environment: object, msg: Any, **_: object) -> None:
        merge_share(run, msg.data)
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
    return env


def locust_failures(env: OpenLoopEnvironment) -> dict[str, int]:
    """Why requests failed, as Locust collected it (from every worker): ``"NAME: reason"`` -> how often."""
    failures: dict[str, int] = {}
    for error in env.stats.errors.values():
        key = f"{error.name}: {error.error}"
        failures[key] = failures.get(key, 0) + error.occurrences
    return dict(sorted(failures.items(), key=lambda kv: -kv[1]))


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
