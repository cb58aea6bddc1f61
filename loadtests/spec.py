"""What one load test is: the target, the service model it is predicted with, the load, and its gates.

Kept apart from :mod:`.run`, which sends the load with Locust (and so must import it,
with gevent's patching, first): a sweep plans its steps, and a test builds one, from the
spec alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError
from ..core.model import ServiceModel
from ..sim.inputs.workload import Workload
from .analysis import Baseline
from .apis import Api

__all__ = ["LoadTestSpec"]


@dataclass(frozen=True)
class LoadTestSpec:
    """Everything a load test depends on.

    ``target`` is ``"sim"`` (start the reference server on the sim backend with
    ``model``, for the run) or the base URL of a running server. ``gpus`` is the
    target's fleet: it lets the simulator predict the same run (None: no prediction).
    """

    target: str
    model: ServiceModel
    workload: Workload
    duration_s: float
    warmup_s: float = 2.0
    seed: int = 0
    gpus: int | None = None
    model_name: str = "sim"
    keys_file: Path | None = None
    workers: int = 0
    batch_log_url: str | None = None  # the target's internal URL: re-simulate with the batches it logged
    api: Api = Api.INFERENCE
    baseline: Baseline | None = None  # an earlier run each P95 stays near
    api_key: str | None = None  # one key for every request (a LiteLLM master key), instead of keys per tier
    scrape_metrics_url: str | None = None  # a Prometheus endpoint to sample during the run
    save_requests: Path | None = None  # every request's times, status and lengths as CSV rows

    def __post_init__(self) -> None:
        if self.target != "sim" and not self.target.startswith(("http://", "https://")):
            raise UsageError(f"must be 'sim' or an http(s) URL, got {self.target!r}", field="target")
        if self.target == "sim" and not self.model.overlap:
            raise UsageError(
                "the reference server always overlaps assembly with GPU work, so a model with overlap = false "
                "would predict another service than the one measured; drop it to test the server",
                field="overlap",
            )
        if self.workload.stream and not self.api.has_tokens:
            raise UsageError("needs a token API: --api completions or --api chat", field="stream")
        if self.api_key is not None and self.keys_file is not None:
            raise UsageError("give either --api-key (one key for all) or --keys (a key per tier)", field="api_key")
        if self.scrape_metrics_url is not None and not self.scrape_metrics_url.startswith(("http://", "https://")):
            raise UsageError("takes the http(s) URL of a Prometheus endpoint", field="scrape_metrics_url")
        if self.batch_log_url is not None:
            if self.target == "sim" or not self.batch_log_url.startswith(("http://", "https://")):
                raise UsageError("takes the internal http(s) URL of a target server you started", field="batch_log_url")
            if self.fleet is None:
                raise UsageError(
                    "the batch-log check re-runs the simulation, which needs the target's GPU count", field="gpus"
                )

    @property
    def fleet(self) -> int | None:
        return self.gpus or (1 if self.target == "sim" else None)
