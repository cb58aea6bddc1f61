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

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pool import Group
from locust import FastHttpUser, task
from locust.env import Environment
from locust.event import EventHook, Events

from ..core.prompt_blocks import SessionHistory
from ..core.records import Outcome, RequestRecords
from ..core.tiers import TIER_NAMES
from .apis import (
    Api,
    Conversation,
    Messages,
    Reading,
    chat_messages,
    prompt_text,
    read_answer,
    read_stream,
    request_body,
)
from .plan import LoadPlan
from .token_log import TokenLog

__all__ = [
    "OpenLoopEnvironment",
    "OpenLoopEvents",
    "OpenLoopRun",
    "OpenLoopUser",
    "expected_output",
    "expected_tokens_text",
]


def expected_output(model: str, text: str) -> str | None:
    """The output a sim-backend server must return for ``text`` (None: not checkable)."""
    if model != "sim":
        return None
    from ..server.backends.sim_gpu import sim_output

    return sim_output(text)


def expected_tokens_text(api: Api, model: str, prompt: str | Messages, tokens: int) -> str | None:
    """The text a sim-backend server must answer ``prompt`` with on a token API (None: not checkable)."""
    if model != "sim":
        return None
    from ..server.backends.base import plain_chat_prompt
    from ..server.backends.sim_gpu import sim_words

    seen = plain_chat_prompt(chat_messages(prompt)) if api is Api.CHAT else prompt
    return sim_words(seen, tokens)


@dataclass
class OpenLoopRun:
    """One Locust process's part of a load test."""

    plan: LoadPlan
    records: RequestRecords  # rows of the whole plan; this process fills its share's
    share_index: int = 0  # this process sends arrivals share_index, share_index + share_count, ...
    share_count: int = 1
    start_at: float = 0.0  # time.time() of schedule time 0; 0: when the user starts
    tokens: TokenLog | None = None  # token APIs: each stream's gaps and who counted

    @classmethod
    def of(cls, plan: LoadPlan, share_index: int = 0, share_count: int = 1, start_at: float = 0.0) -> OpenLoopRun:
        """A run with empty records for the whole plan (token columns when the API has tokens)."""
        arrivals, tokens = plan.arrivals, plan.api.has_tokens
        records = RequestRecords.unanswered(arrivals.times, arrivals.tiers, with_tokens=tokens)
        log = TokenLog.empty(len(arrivals)) if tokens else None
        return cls(plan, records, share_index, share_count, start_at, log)


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
        plan = run.plan
        idx = plan.share(run.share_index, run.share_count)
        times, sessions = plan.arrivals.times, plan.sessions
        group = Group()
        start_at = run.start_at or time.time()
        perf0 = time.perf_counter() - (time.time() - start_at)  # perf_counter at schedule time 0
        for i in idx:
            if sessions is not None and sessions.turn[i] > 1:
                continue  # sent by its session when the turn before has ended
            delay = perf0 + times[i] - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self._send if sessions is None else self._send_session, run, int(i), perf0)
        last_turns_s = max(0.0, perf0 + plan.until_s - time.perf_counter()) if sessions is not None else 0.0
        group.join(timeout=last_turns_s + plan.timeout_s + 5)
        group.kill(block=True, timeout=2)
        self.environment.events.share_sent.fire(indices=idx, records=run.records)
        self.stop()

    def _send(self, run: OpenLoopRun, i: int, perf0: float) -> None:
        if run.plan.api.has_tokens:
            self._send_tokens(run, i, perf0)
            return
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
            _settle(resp, records, i, status, Outcome.of_answer(status, right_output=right))

    def _send_session(self, run: OpenLoopRun, i: int, perf0: float) -> None:
        """A conversation, closed-loop: each later turn a think time after the turn before ended (answered or
        not), with the history and the target's own answers, until the run's end (SPEC section 13)."""
        plan, records = run.plan, run.records
        assert plan.sessions is not None and plan.arrivals.think_s is not None
        talk = Conversation(plan.api)
        while True:
            self._send_tokens(run, i, perf0, talk)
            after = int(plan.sessions.next[i])
            if after < 0:
                return
            due = float(records.finished[i] + plan.arrivals.think_s[after])
            if due > plan.until_s:
                return  # the run is over: a load test sends nothing after its end, as the simulation does not
            delay = perf0 + due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            records.scheduled[after] = due  # latency counts from when the turn was due, as for open-loop arrivals
            i = after

    def _send_tokens(self, run: OpenLoopRun, i: int, perf0: float, talk: Conversation | None = None) -> None:
        """One completions or chat request (a turn of ``talk``'s conversation, when given); a stream is read chunk
        by chunk, each content chunk timed."""
        plan, records, log = run.plan, run.records, run.tokens
        assert log is not None and records.first_token is not None and plan.arrivals.output_tokens is not None
        assert records.prompt_tokens is not None and records.output_tokens is not None
        tier = int(plan.arrivals.tiers[i])
        prefix = plan.arrivals.prefixes[i] if plan.arrivals.prefixes is not None else None
        if isinstance(prefix, SessionHistory):  # a turn's own message: its session's system prompt before the first
            prefix = prefix.system if plan.sessions is not None and plan.sessions.turn[i] == 1 else None
        message = prompt_text(i, plan.message_tokens(i), plan.tokenizer, prefix)
        prompt: str | Messages = talk.asking(message) if talk is not None else message
        wanted = int(plan.arrivals.output_tokens[i])
        headers = {"Authorization": f"Bearer {plan.keys[tier]}"}
        if plan.stream:
            headers["Accept-Encoding"] = "identity"  # chunks as they are sent, never a compressed whole
        records.sent[i] = time.perf_counter() - perf0
        with self.client.post(
            f"{plan.url}{plan.api.path}",
            json=request_body(plan.api, plan.model, prompt, wanted, stream=plan.stream),
            headers=headers,
            name=f"{plan.api.path} [{TIER_NAMES[tier]}]",
            catch_response=True,
            stream=plan.stream,
        ) as resp:
            status = resp.status_code or 0
            reading, broke = _read(resp, plan, status)
            records.finished[i] = time.perf_counter() - perf0
            if reading.token_times:
                records.first_token[i] = reading.token_times[0] - perf0
            records.output_tokens[i] = reading.output_tokens
            records.prompt_tokens[i] = reading.prompt_tokens or 0
            if records.cached_tokens is not None and reading.cached_tokens is not None:
                records.cached_tokens[i] = reading.cached_tokens
            log.record(i, reading.counted_by, reading.token_times)
            outcome = Outcome.of_answer(status)
            if broke:
                outcome = Outcome.TRANSPORT_ERROR
            elif status == 200 and reading.problem is not None:
                outcome = Outcome.BAD_RESPONSE
            elif status == 200:
                expected = expected_tokens_text(plan.api, plan.model, prompt, reading.output_tokens)
                if expected is not None and "".join(reading.text) != expected:
                    outcome = Outcome.WRONG_OUTPUT
            _settle(resp, records, i, status, outcome, reading.problem)
        if talk is not None and outcome is Outcome.OK:
            talk.answered(message, "".join(reading.text))


def _read(resp: Any, plan: LoadPlan, status: int) -> tuple[Reading, bool]:
    """The answer's tokens; ``broke`` when the connection failed or timed out mid-answer."""
    if status != 200:
        with contextlib.suppress(Exception):
            resp.content  # noqa: B018  (reads the error body, so the connection goes back to the pool)
        return Reading(), False
    try:
        if not plan.stream:
            return read_answer(resp.json(), plan.api), False
        kind = (resp.headers or {}).get("content-type", "")
        if not kind.startswith("text/event-stream"):
            resp.content  # noqa: B018
            return Reading(problem=f"asked for a stream, got {kind or 'no content type'}"), False
        raw = resp._response  # geventhttpclient's response: lines as they arrive (Locust's reads whole blocks)
        return read_stream(lambda: raw.readline(b"\n")), False
    except ValueError:
        return Reading(problem="an answer that is not JSON"), False
    except Exception as err:  # a socket error or timeout mid-stream (geventhttpclient raises several kinds)
        return Reading(problem=f"{type(err).__name__} reading the answer"), True


def _settle(resp: Any, records: RequestRecords, i: int, status: int, outcome: Outcome, why: str | None = None) -> None:
    records.status[i], records.outcome[i] = status, outcome  # type: ignore[index]
    if outcome is Outcome.OK:
        resp.success()
    else:
        resp.failure(why or _FAILURES.get(outcome, f"HTTP {status}"))


_FAILURES = {
    Outcome.WRONG_OUTPUT: "wrong output for this request",
    Outcome.REJECTED: "429 shed",
    Outcome.TRANSPORT_ERROR: "no answer (connection failed or timed out)",
}


def _is_output_for(resp: object, model: str, text: str) -> bool:
    try:
        output = resp.json().get("output")  # type: ignore[attr-defined]
    except Exception:
        return False
    expected = expected_output(model, text)
    return output is not None and (expected is None or output == expected)
