"""Prometheus metrics of one server, in a registry of its own (several apps may share a process).

Label children are bound once here, so the request path only calls ``inc()``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..core.tiers import Tier

__all__ = ["ServerMetrics"]

_BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 80, 100, 200, 500)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("inferplan_queue_depth", "Requests waiting, by tier", ["tier"], registry=r)
        self.batch_size = Histogram(
            "inferplan_batch_size", "Requests per batch", buckets=_BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "inferplan_batch_latency_seconds", "Backend time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "inferplan_request_latency_seconds",
            "Arrival to response, by tier",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.gpus_busy = Gauge("inferplan_gpus_busy", "GPUs running a batch now", registry=r)
        self.batch_phase = Histogram(
            "inferplan_batch_phase_seconds",
            "Time of each phase of a batch (PCIe in, kernel, PCIe out), from a backend that times them",
            ["phase"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.requests_running = Gauge(
            "inferplan_requests_running", "Requests on a GPU now (sequences, in continuous batching)", registry=r
        )
        self.gpus = Gauge("inferplan_gpus", "GPUs in the worker pool", registry=r)
        self.gpus_provisioning = Gauge(
            "inferplan_gpus_provisioning", "GPUs the autoscaler ordered, still cold-starting", registry=r
        )
        self.gpus_draining = Gauge(
            "inferplan_gpus_draining", "GPUs released, finishing what they run before they leave", registry=r
        )
        self.replicas = Gauge("inferplan_replicas", "Engine replicas registered, by state", ["state"], registry=r)
        self.gpu_busy_seconds = Counter("inferplan_gpu_busy_seconds", "GPU time spent running batches", registry=r)
        self.rejected = Counter(
            "inferplan_rejected", "Requests refused, by tier and reason", ["tier", "reason"], registry=r
        )
        self.key_in_flight_peak = Gauge(
            "inferplan_key_in_flight_peak",
            "Most requests one limited key of the tier has had in flight at once (all instances with --redis)",
            ["tier"],
            registry=r,
        )
        self.responses = Counter("inferplan_responses", "Responses by tier and status", ["tier", "status"], registry=r)
        self.backend_faults = Counter("inferplan_backend_faults", "Failed batches by kind", ["kind"], registry=r)
        self.engine_restarts = Counter(
            "inferplan_engine_restarts", "Engine processes (Ray actors) that died and were restarted", registry=r
        )
        self._restarts_counted = 0
        self.client_disconnects = Counter(
            "inferplan_client_disconnects", "Clients that hung up before their answer, by stage", ["stage"], registry=r
        )
        # Shared queue (serve --redis): how much work crosses instances, and what was reclaimed from dead ones.
        self.shared_remote = Counter(
            "inferplan_shared_remote_requests", "Requests run here that another instance admitted", registry=r
        )
        self.shared_mixed = Counter(
            "inferplan_shared_mixed_batches", "Batches run here holding requests of several instances", registry=r
        )
        self.shared_reclaimed = Counter(
            "inferplan_shared_reclaimed_requests",
            "Requests of a dead instance's batch put back in the queue (requeued) or dropped (owner gone)",
            ["outcome"],
            registry=r,
        )
        # The OpenAI surface: tokens, as the engines' own servers count them.
        self.ttft = Histogram(
            "inferplan_time_to_first_token_seconds",
            "Arrival to the first token written to a streamed request, by tier",
            ["tier"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inferplan_inter_token_latency_seconds",
            "Gaps between consecutive tokens written to streamed requests",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "inferplan_prompt_tokens", "Prompt tokens of answered requests", ["tier"], registry=r
        )
        self.generation_tokens = Counter(
            "inferplan_generation_tokens", "Tokens generated for answered requests", ["tier"], registry=r
        )
        self.tier_ttft = [self.ttft.labels(t.label) for t in Tier]
        self.tier_prompt_tokens = [self.prompt_tokens.labels(t.label) for t in Tier]
        self.tier_generation_tokens = [self.generation_tokens.labels(t.label) for t in Tier]
        self.tier_depth = [self.queue_depth.labels(t.label) for t in Tier]
        self.tier_latency = [self.request_latency.labels(t.label) for t in Tier]
        self.shed = [self.rejected.labels(t.label, "backpressure") for t in Tier]
        self.ok = [self.responses.labels(t.label, "200") for t in Tier]

    def count_engine_restarts(self, total: int) -> None:
        """Bring the restart counter up to the backend's own count (read at each scrape)."""
        if total > self._restarts_counted:
            self.engine_restarts.inc(total - self._restarts_counted)
            self._restarts_counted = total
