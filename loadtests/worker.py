"""A Locust worker process for ``infer-plan loadtest --workers N``.

Run on another machine with ``python -m infer_plan.loadtests.worker --master-host HOST
--master-port PORT --plan PLAN.npz --out DIR --workers N`` (the plan file and output
folder must be reachable, e.g. a shared mount).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gevent
from locust.env import Environment

from .locust_user import OpenLoopUser
from .plan import LoadPlan, Records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--master-host", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, required=True)
    args = parser.parse_args()

    plan = LoadPlan.load(args.plan)
    records = Records.empty(plan)

    class WorkerUser(OpenLoopUser):
        def finished_share(self, indices) -> None:
            tmp = args.out / f".records-{os.getpid()}.npz"
            records.save(tmp, indices)
            tmp.rename(args.out / f"records-{os.getpid()}.npz")

    WorkerUser.__name__ = OpenLoopUser.__name__  # the master dispatches users by class name
    env = Environment(user_classes=[WorkerUser], host=plan.url)
    OpenLoopUser.plan, OpenLoopUser.records, OpenLoopUser.share_count = plan, records, args.workers
    runner = env.create_worker_runner(args.master_host, args.master_port)
    runner.greenlet.join()
    gevent.sleep(0)


if __name__ == "__main__":
    main()
