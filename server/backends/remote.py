"""Another infer-plan server's internal batch API as the engine (``--backend remote --upstream URL``).

This is the split the design draws between the gateway and the GPU worker pool: a
batch crosses as ``{"batch_id", "requests": [{"input"}]}`` and its results come back by
index position. ``infer-plan calibrate --backend remote`` uses it to measure a running
server in place, with its own process, threads and neighbours, rather than an engine
loaded alone.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from ...core.errors import UsageError
from ...core.model import ServiceModel
from .base import BackendError, EngineFlags, Generate, Generated
from .http_client import ForwardingBackend, ForwardingOptions, post_json

__all__ = ["RemoteBackend"]


class RemoteBackend(ForwardingBackend):
    name: ClassVar[str] = "remote"

    @classmethod
    def options_from(cls, flags: EngineFlags) -> dict[str, Any]:
        if not flags.upstream:
            raise UsageError("--backend remote needs --upstream URL (another server's internal listener)")
        return {"upstream": flags.upstream}

    def __init__(self, model: ServiceModel, options: ForwardingOptions) -> None:
        super().__init__(model, options)
        self.endpoint = f"{self.base}/internal/batch"
        self._ids = itertools.count(1)

    async def run_batch(self, requests: list[Generate], gpu: int) -> list[Generated]:
        batch_id = f"b{next(self._ids)}"
        data = await post_json(
            self._session, self.endpoint, {"batch_id": batch_id, "requests": [r.to_wire() for r in requests]}
        )
        try:
            results = sorted(data["results"], key=lambda r: r["index"])
            outputs = [Generated.from_wire(r) for r in results]
        except (KeyError, TypeError, ValueError) as err:
            raise BackendError(f"{self.endpoint} sent no results/index/output: {err!r}") from err
        if data.get("batch_id") != batch_id or [r["index"] for r in results] != list(range(len(requests))):
            raise BackendError(f"{self.endpoint} answered batch {data.get('batch_id')!r} with {len(outputs)} results")
        return outputs
