"""What a load test sends: the arrival schedule, keys per tier, and where.

The plan travels to Locust worker processes as bytes (a Locust message from the master,
so a worker on another machine needs nothing but the master's address); worker *k* of
*N* sends arrivals ``k, k+N, k+2N, ...``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from ..sim.arrivals import Arrivals

__all__ = ["LoadPlan"]


@dataclass(frozen=True)
class LoadPlan:
    url: str
    arrivals: Arrivals
    keys: dict[int, str]  # tier -> API key
    model: str
    timeout_s: float = 60.0

    def to_bytes(self) -> bytes:
        meta = json.dumps(
            {
                "url": self.url,
                "keys": {str(k): v for k, v in self.keys.items()},
                "model": self.model,
                "timeout_s": self.timeout_s,
            }
        )
        buffer = io.BytesIO()
        np.savez(buffer, times=self.arrivals.times, tiers=self.arrivals.tiers, meta=np.array(meta))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LoadPlan:
        with np.load(io.BytesIO(data)) as arrays:
            meta = json.loads(str(arrays["meta"]))
            arrivals = Arrivals(times=arrays["times"].copy(), tiers=arrays["tiers"].copy())
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
