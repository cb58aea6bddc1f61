"""What a load test sends: the arrival schedule, keys per tier, and where.

The plan is a plain file (``.npz``) so Locust worker processes can load the very same
schedule the master made; worker *k* of *N* sends arrivals ``k, k+N, k+2N, ...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sim.arrivals import Arrivals

__all__ = ["LoadPlan", "Records"]


@dataclass(frozen=True)
class LoadPlan:
    url: str
    arrivals: Arrivals
    keys: dict[int, str]  # tier -> API key
    model: str
    timeout_s: float = 60.0

    def save(self, path: Path) -> None:
        meta = json.dumps(
            {
                "url": self.url,
                "keys": {str(k): v for k, v in self.keys.items()},
                "model": self.model,
                "timeout_s": self.timeout_s,
            }
        )
        np.savez(path, times=self.arrivals.times, tiers=self.arrivals.tiers, meta=np.array(meta))

    @classmethod
    def load(cls, path: Path) -> LoadPlan:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            arrivals = Arrivals(times=data["times"].copy(), tiers=data["tiers"].copy())
        return cls(
            url=meta["url"],
            arrivals=arrivals,
            keys={int(k): v for k, v in meta["keys"].items()},
            model=meta["model"],
            timeout_s=meta["timeout_s"],
        )

    def share(self, index: int, count: int) -> np.ndarray:
        """Indices of the arrivals that worker ``index`` of ``count`` sends."""
        return np.arange(index, len(self.arrivals), count)


@dataclass
class Records:
    """Exact per-request outcomes (Locust's own stats round to buckets), indexed like the plan."""

    scheduled: np.ndarray
    sent: np.ndarray
    finished: np.ndarray
    status: np.ndarray  # HTTP status; 0 = transport error or never answered
    tiers: np.ndarray
    wrong_output: np.ndarray  # bool: a 200 whose output was not this request's

    @classmethod
    def empty(cls, plan: LoadPlan) -> Records:
        n = len(plan.arrivals)
        return cls(
            scheduled=plan.arrivals.times.copy(),
            sent=np.full(n, np.nan),
            finished=np.full(n, np.nan),
            status=np.zeros(n, dtype=np.int32),
            tiers=plan.arrivals.tiers.copy(),
            wrong_output=np.zeros(n, dtype=bool),
        )

    def save(self, path: Path, indices: np.ndarray) -> None:
        np.savez(
            path,
            indices=indices,
            sent=self.sent[indices],
            finished=self.finished[indices],
            status=self.status[indices],
            wrong_output=self.wrong_output[indices],
        )

    def merge_file(self, path: Path) -> None:
        with np.load(path) as data:
            idx = data["indices"]
            self.sent[idx] = data["sent"]
            self.finished[idx] = data["finished"]
            self.status[idx] = data["status"]
            self.wrong_output[idx] = data["wrong_output"]

    @property
    def latency_ms(self) -> np.ndarray:
        """From the scheduled send time, so generator lag cannot hide latency."""
        return (self.finished - self.scheduled) * 1000.0

    @property
    def service_ms(self) -> np.ndarray:
        """From the actual send time."""
        return (self.finished - self.sent) * 1000.0

    @property
    def send_lag_ms(self) -> np.ndarray:
        return (self.sent - self.scheduled) * 1000.0
