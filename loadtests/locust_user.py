"""The Locust user that makes open-loop load.

Locust users are closed loops by default (each waits for its answer before the next
request), which hides overload. This user instead walks the plan's schedule and
fires each request in its own greenlet at its scheduled time, answered or not; Locust
still records every request in its stats (named per tier) and runs the show (local,
or master and workers). Exact times go to :class:`~.plan.Records` as well.
"""

from __future__ import annotations

import time

import gevent
from gevent.pool import Group
from locust import FastHttpUser, task

from .plan import LoadPlan, Records

__all__ = ["OpenLoopUser", "expected_output"]

TIER_LABELS = ("enterprise", "paid", "free")


def expected_output(model: str, text: str) -> str | None:
    """The output a sim-backend server must return for ``text`` (None: not checkable)."""
    if model != "sim":
        return None
    from ..server.backends.sim import sim_output

    return sim_output(text)


class OpenLoopUser(FastHttpUser):
    """One user sends a whole share of the plan; set ``plan``/``records``/``share`` before starting."""

    host = "http://127.0.0.1"
    concurrency = 4000  # connections in the pool: open loop means many requests in flight under overload
    network_timeout = 60.0
    connection_timeout = 10.0
    plan: LoadPlan | None = None
    records: Records | None = None
    share_count: int = 1  # N workers; this user's index comes from the worker runner
    start_at: float = 0.0  # wall-clock (time.time) of schedule time 0; 0: when the task starts
    done = None  # gevent Event set when the share is sent and answered

    @task
    def run_schedule(self) -> None:
        plan, records = self.plan, self.records
        assert plan is not None and records is not None
        idx = plan.share(getattr(self.environment.runner, "worker_index", 0), self.share_count)
        times = plan.arrivals.times
        group = Group()
        start_at = self.start_at or time.time()
        perf0 = time.perf_counter() - (time.time() - start_at)  # perf_counter at schedule time 0
        for i in idx:
            delay = perf0 + times[i] - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self._send, int(i), perf0)
        group.join(timeout=plan.timeout_s + 5)
        group.kill(block=True, timeout=2)
        if self.done is not None:
            self.done.set()
        self.finished_share(idx)
        self.stop()

    def finished_share(self, indices) -> None:
        """Hook: a worker process saves its records here."""

    def _send(self, i: int, perf0: float) -> None:
        plan, records = self.plan, self.records
        tier = int(plan.arrivals.tiers[i])
        text = f"lt-{i}"
        records.sent[i] = time.perf_counter() - perf0
        with self.client.post(
            f"{plan.url}/v1/inference",
            json={"model": plan.model, "input": text},
            headers={"Authorization": f"Bearer {plan.keys[tier]}"},
            name=f"/v1/inference [{TIER_LABELS[tier]}]",
            catch_response=True,
        ) as resp:
            records.finished[i] = time.perf_counter() - perf0
            status = resp.status_code or 0
            records.status[i] = status
            if status == 200:
                expected = expected_output(plan.model, text)
                try:
                    output = resp.json().get("output")
                except Exception:
                    output = None
                if output is None or (expected is not None and output != expected):
                    records.wrong_output[i] = True
                    resp.failure("wrong output for this request")
                else:
                    resp.success()
            elif status == 429:
                resp.failure("429 shed")
            else:
                resp.failure(f"HTTP {status}")
