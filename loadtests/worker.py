"""A Locust worker process for ``infer-plan loadtest --workers N``.

``loadtest --workers N`` starts N of these on this machine. To add load generators on
other machines, run ``python -m infer_plan.loadtests.worker --master-host HOST
--master-port PORT`` there: the master sends each worker the plan and collects its
records as Locust messages, so nothing else needs sharing.
"""

from __future__ import annotations

import argparse
from typing import Any

import gevent

from .harness import PLAN_MESSAGE, RECORDS_MESSAGE, share_message
from .locust_user import OpenLoopEnvironment, OpenLoopRun
from .plan import LoadPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--master-host", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, required=True)
    args = parser.parse_args()

    env = OpenLoopEnvironment(host="http://127.0.0.1")
    runner = env.create_worker_runner(args.master_host, args.master_port)

    def on_plan(environment: OpenLoopEnvironment, msg: Any, **_: object) -> None:
        plan = LoadPlan.from_bytes(msg.data["plan"])
        environment.host = plan.url
        environment.open_loop = OpenLoopRun.of(plan, runner.worker_index, int(msg.data["count"]))

    def on_share_sent(indices: Any, **_: object) -> None:
        assert env.open_loop is not None
        runner.send_message(RECORDS_MESSAGE, share_message(env.open_loop, indices))

    runner.register_message(PLAN_MESSAGE, on_plan)
    env.events.share_sent.add_listener(on_share_sent)
    runner.greenlet.join()
    gevent.sleep(0)


if __name__ == "__main__":
    main()
