"""The Locust user that makes open-loop load, and the environment that carries its run.

Locust users are closed loops by default (each waits for its answer before the next
request), which hides overload. This user instead walks the plan's schedule and fires
each request in its own greenlet at its scheduled time, answered or not; Locust still
records every request in its stats (named per tier) and runs the show (local, or master
and workers). Exact times go to the run's :class:`~infer_plan.core.records.RequestRecords`.

Everything a run needs rides on the Locust :class:`~locust.env.Environment` handed to
every user (:class:`OpenLoopEnvironment`), and the end of a share is the Locust event
``share_sent``, so the local harness and a worker process differ only in their listener.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gevent
from gevent.pool import Group
from locust import FastHttpUser, task
from locust.env import Environment
from locust.event import EventHook, Events

from ..core.records import Outcome, RequestRecords
from ..core.tiers import TIER_NAMES
from .plan import LoadPlan

__all__ = ["OpenLoopEnvironment", "OpenLoopEvents", "OpenLoopRun", "OpenLoopUser", "expected_output"]


def expected_output(model: str, text: str) -> str | None:
    """The output a sim-backend server must return for ``text`` (None: not checkable)."""
    if model != "sim":
        return None
    from ..server.backends.sim import sim_output

    return sim_output(text)


@dataclass
class OpenLoopRun:
    """One Locust process's part of a load test."""

    plan: LoadPlan
    records: RequestRecords  # rows of the whole plan; this process fills its share's
    share_index: int = 0  # this process sends arrivals share_index, share_index + share_count, ...
    share_count: int = 1
    start_at: float = 0.0  # time.time() of schedule time 0; 0: when the user starts


class OpenLoopEvents(Events):
    share_sent: EventHook
    """
    Fired when this process's share of the plan has been sent and every request answered or given up on.

    Event arguments:

    :param indices: the plan rows this process sent (numpy array)
    :param records: the run's RequestRecords, those rows filled in
    """

    def __init__(self) -> None:
        super().__init__()  # makes hooks from this class's own annotations only (Locust reads __annotations__),
        for name in Events.__annotations__:  # so Locust's own hooks are made here
            setattr(self, name, EventHook())


class OpenLoopEnvironment(Environment):
    """A Locust environment that also holds the open-loop run (set later on a worker, when the plan arrives)."""

    def __init__(self, *, host: str, run: OpenLoopRun | None = None) -> None:
        super().__init__(user_classes=[OpenLoopUser], host=host, events=OpenLoopEvents())
        self.open_loop = run


class OpenLoopUser(FastHttpUser):
    """One user sends a whole share of the plan; it reads the run from its environment."""

    host = "http://127.0.0.1"
    concurrency = 4000  # connections in the pool: open loop means many requests in flight under overload
    network_timeout = 60.0
    connection_timeout = 10.0
    environment: OpenLoopEnvironment

    @task
    def run_schedule(self) -> None:
        run = self.environment.open_loop
        assert run is not None, "the open-loop run must be set on the environment before users start"
        idx = run.plan.share(run.share_index, run.share_count)
        times = run.plan.arrivals.times
        group = Group()
        start_at = run.start_at or time.time()
        perf0 = time.perf_counter() - (time.time() - start_at)  # perf_counter at schedule time 0
        for i in idx:
            delay = perf0 + times[i] - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self._send, run, int(i), perf0)
        group.join(timeout=run.plan.timeout_s + 5)
        group.kill(block=True, timeout=2)
        self.environment.events.share_sent.fire(indices=idx, records=run.records)
        self.stop()

    def _send(self, run: OpenLoopRun, i: int, perf0: float) -> None:
        plan, records = run.plan, run.records
        tier = int(plan.arrivals.tiers[i])
        text = f"lt-{i}"
        records.sent[i] = time.perf_counter() - perf0
        with self.client.post(
            f"{plan.url}/v1/inference",
            json={"model": plan.model, "input": text},
            headers={"Authorization": f"Bearer {plan.keys[tier]}"},
            name=f"/v1/inference [{TIER_NAMES[tier]}]",
            catch_response=True,
        ) as resp:
            records.finished[i] = time.perf_counter() - perf0
            status = resp.status_code or 0
            right = status != 200 or _is_output_for(resp, plan.model, text)
            outcome = Outcome.of_answer(status, right_output=right)
            records.status[i], records.outcome[i] = status, outcome
            if outcome is Outcome.OK:
                resp.success()
            else:
                resp.failure(_FAILURES.get(outcome, f"HTTP {status}"))


_FAILURES = {Outcome.WRONG_OUTPUT: "wrong output for this request", Outcome.REJECTED: "429 shed"}


def _is_output_for(resp: object, model: str, text: str) -> bool:
    try:
        output = resp.json().get("output")  # type: ignore[attr-defined]
    except Exception:
        return False
    expected = expected_output(model, text)
    return output is not None and (expected is None or output == expected)
