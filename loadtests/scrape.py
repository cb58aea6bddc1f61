"""The target's own view during a load test: its Prometheus gauges, sampled about once a second.

vLLM (``vllm:num_requests_waiting`` / ``vllm:num_requests_running``), SGLang and our own
server export how many requests wait and how many run; beside the measured latency
they tell a queue that builds at the target from one that builds in the network or
the generator. A sample that fails is counted, never fatal: this view is optional.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import gevent
from prometheus_client.parser import text_string_to_metric_families

from ..core.schema import ServerMetrics

__all__ = ["RUNNING", "WAITING", "parse_sample", "scraping"]

# Candidate gauges, first found wins: vLLM, SGLang, infer-plan's reference server.
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "inferplan_queue_depth")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs", "inferplan_requests_running")
GPUS = ("inferplan_gpus",)  # an autoscaling reference server: GPUs serving, and those still cold-starting
PROVISIONING = ("inferplan_gpus_provisioning",)
_KNOWN = frozenset(WAITING + RUNNING + GPUS + PROVISIONING)


def parse_sample(text: str) -> dict[str, float]:
    """Each known gauge's value in one exposition (summed over its labels: tiers, engines)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _KNOWN:
                found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)
    return found


@dataclass
class _Scrape:
    url: str
    started: float  # time.time() the run's schedule is measured from (about)
    t_s: list[float] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    failed: int = 0

    def once(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=2.0) as resp:
                text = resp.read().decode("utf-8", "replace")
            sample = parse_sample(text)
        except Exception:  # unreachable, not Prometheus text: one more failed scrape
            self.failed += 1
            return
        self.t_s.append(time.time() - self.started)
        self.samples.append(sample)

    def result(self) -> ServerMetrics:
        names = {
            "waiting": _first(WAITING, self.samples), "running": _first(RUNNING, self.samples),
            "gpus": _first(GPUS, self.samples), "gpus_provisioning": _first(PROVISIONING, self.samples),
        }  # fmt: skip
        series = {key: [s.get(name or "") for s in self.samples] for key, name in names.items()}
        return ServerMetrics(
            url=self.url,
            t_s=self.t_s,
            waiting=series["waiting"],
            running=series["running"],
            gpus=series["gpus"] if names["gpus"] else [],
            gpus_provisioning=series["gpus_provisioning"] if names["gpus_provisioning"] else [],
            names={k: v for k, v in names.items() if v},
            failed_scrapes=self.failed,
        )


def _first(candidates: tuple[str, ...], samples: list[dict[str, float]]) -> str | None:
    return next((name for name in candidates if any(name in s for s in samples)), None)


@contextlib.contextmanager
def scraping(url: str | None, started: float, every_s: float = 1.0) -> Iterator[_Scrape | None]:
    """Sample ``url`` every ``every_s`` in a greenlet while the block runs (nothing when ``url`` is None)."""
    if url is None:
        yield None
        return
    scrape = _Scrape(url, started)

    def loop() -> None:
        while True:
            scrape.once()
            gevent.sleep(every_s)

    greenlet = gevent.spawn(loop)
    try:
        yield scrape
    finally:
        greenlet.kill(block=True, timeout=5)
