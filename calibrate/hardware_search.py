"""The cheapest hardware for a model and its SLOs: every (GPU, tensor-parallel degree) derived, planned, ranked.

Each option is a profile derived from measured kernel data (:mod:`.derive`) and the
ordinary capacity search on it (tiers, zones, autoscaling and failures as the scenario
sets them); the search's "GPUs" are engine replicas here, each ``tp`` GPUs. Options run
in parallel, one per worker process, the package loaded once before the workers fork.
Ranked by dollars an hour when prices are given (else by GPUs), a tie broken by TTFT P95;
an option on the cost-versus-TTFT frontier is one that no other beats on both.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import socket
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..core import ServiceModel
from ..core.errors import UsageError
from ..core.model import Batching
from ..core.schema import HardwareOption, HardwarePlanResult
from ..sim.inputs.workload import Workload
from ..sim.planning.planner import plan_capacity
from ..sim.runner import RunSettings
from .derive import derive_profile
from .hardware import HardwareConfig, check_names

__all__ = ["HardwareSearch", "load_prices", "plan_hardware"]


@dataclass(frozen=True, slots=True)
class HardwareSearch:
    """The question: one model under one engine, on each of these GPUs at each of these TP degrees."""

    model: str
    gpus: tuple[str, ...]
    tps: tuple[int, ...]
    engine: str = "vllm"
    prices: dict[str, float] | None = None  # USD per GPU-hour, by the package's GPU names
    prices_source: str | None = None
    memory_fraction: float | None = None
    step_overhead_ms: float = 0.0
    dispatch_overhead_ms: float | None = None
    ray_address: str | None = None  # where the options are planned: a Ray cluster, else local processes


def load_prices(path: Path) -> tuple[dict[str, float], str]:
    """A prices TOML: ``[prices]`` GPU = USD per GPU-hour, and a ``[source]`` that says where they came from."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--prices: {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--prices: {path} is not TOML ({err})") from None
    prices = data.get("prices")
    if not isinstance(prices, dict) or not prices:
        raise UsageError(f"--prices: {path} needs a [prices] table of GPU = USD per GPU-hour")
    for gpu, price in prices.items():
        if not isinstance(price, int | float) or isinstance(price, bool) or price <= 0:
            raise UsageError(f"--prices: {path}: {gpu} = {price!r} is not a price (USD per GPU-hour > 0)")
    source = data.get("source", {})
    label = source.get("label") if isinstance(source, dict) else None
    return {gpu: float(price) for gpu, price in prices.items()}, str(label or path)


def check_search(search: HardwareSearch) -> None:
    """Names the package does not know, and GPUs without a price, are one line before any work (TP and fit are
    judged per option)."""
    check_names(search.model, search.gpus, search.engine)
    if search.prices is not None:
        missing = [gpu for gpu in search.gpus if gpu not in search.prices]
        if missing:
            raise UsageError(f"--prices has no price for {', '.join(missing)}")


def _plan_option(
    search: HardwareSearch, gpu: str, tp: int, base: ServiceModel, workload: Workload, settings: RunSettings,
    max_replicas: int | None,
) -> HardwareOption:  # fmt: skip
    """One option: derive its profile, plan its replicas; a model that does not fit is skipped, with why."""
    option = HardwareOption(gpu=gpu, tp=tp, engine=search.engine)
    try:
        derived = derive_profile(
            HardwareConfig(search.model, gpu, tp, search.engine), memory_fraction=search.memory_fraction,
            step_overhead_ms=search.step_overhead_ms, dispatch_overhead_ms=search.dispatch_overhead_ms,
        )  # fmt: skip
    except UsageError as err:
        return option.model_copy(update={"skipped": str(err)})
    model = ServiceModel(**{**base.model_dump(), **derived.service})
    plan = plan_capacity(model, workload, settings, max_gpus=max_replicas)
    price = (search.prices or {}).get(gpu)
    gpus = plan.gpus * tp if plan.gpus is not None else None
    usd_hour = gpus * price if gpus is not None and price is not None else None
    tokens_per_hour = workload.schedule.rps * workload.shape(model).output_tokens * 3600.0
    return option.model_copy(
        update={
            "replicas": plan.gpus, "gpus": gpus, "price_per_gpu_hour": price, "usd_per_hour": usd_hour,
            "usd_per_million_output_tokens": usd_hour / tokens_per_hour * 1e6 if usd_hour is not None else None,
            "p95_ms": plan.p95_ms, "ttft_p95_ms": plan.ttft_p95_ms, "itl_p95_ms": plan.itl_p95_ms,
            "binding_constraint": plan.binding_constraint,
            "fit_max_relative_error": derived.provenance["fit_max_relative_error"],
            "kv_cache_tokens": derived.service["kv_cache_tokens"], "plan": plan,
        }
    )  # fmt: skip


def _ranked(options: list[HardwareOption], by_cost: bool) -> list[HardwareOption]:
    """Planned options cheapest first (then faster), then those that met no count, then the skipped; the
    frontier marked among the planned."""

    def cost(o: HardwareOption) -> float:
        return (o.usd_per_hour if by_cost else o.gpus) or 0.0

    planned = sorted((o for o in options if o.replicas is not None), key=lambda o: (cost(o), o.ttft_p95_ms or 0.0))
    frontier, best_ttft = [], float("inf")
    for o in planned:  # cheapest first: on the frontier when faster than everything cheaper
        ttft = o.ttft_p95_ms if o.ttft_p95_ms is not None else float("inf")
        on = ttft < best_ttft
        best_ttft = min(best_ttft, ttft)
        frontier.append(o.model_copy(update={"pareto": on}))
    failed = [o for o in options if o.replicas is None and o.skipped is None]
    skipped = [o for o in options if o.skipped is not None]
    return frontier + failed + skipped


def plan_hardware(
    search: HardwareSearch,
    base: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    *,
    max_replicas: int | None = None,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> HardwarePlanResult:
    """Every (GPU, TP) of ``search`` planned for ``workload``: at most ``jobs`` at once in worker processes, or
    each as a task on the Ray cluster at ``search.ray_address`` (the search over GPUs x TP x counts is where
    one machine runs out)."""
    check_search(search)
    started = time.perf_counter()
    pairs = list(itertools.product(search.gpus, search.tps))
    calls = [(search, gpu, tp, base, workload, settings, max_replicas) for gpu, tp in pairs]
    if search.ray_address is not None:
        options, ran_on = _on_ray(search.ray_address, calls, progress), f"Ray cluster at {search.ray_address}"
    elif jobs <= 1 or len(pairs) == 1:
        options, ran_on = [], "this process"
        for call in calls:
            if progress:
                progress(f"planning {call[2]} x {call[1]}")
            options.append(_plan_option(*call))
    else:
        options, ran_on = _in_processes(jobs, calls, progress), f"{min(jobs, len(calls))} worker processes"
    if all(o.skipped for o in options):
        raise UsageError(f"{search.model} fits none of the options: " + "; ".join(o.skipped or "" for o in options))
    by_cost = search.prices is not None
    return HardwarePlanResult(
        model=search.model, engine=search.engine, rps=workload.schedule.rps,
        output_tokens_per_request=_output_tokens(workload, base), prices=search.prices_source,
        ranked_by="USD per hour" if by_cost else "GPUs (no --prices)", options=_ranked(options, by_cost),
        elapsed_s=time.perf_counter() - started, jobs=jobs, ran_on=ran_on,
    )  # fmt: skip


def _output_tokens(workload: Workload, base: ServiceModel) -> float:
    """Mean output tokens a request, as a derived (continuous) engine reads the workload."""
    shape = workload.shape(base.model_copy(update={"batching": Batching.CONTINUOUS}))
    return shape.output_tokens if shape is not None else 0.0


def _report(progress: Callable[[str], None] | None, done: int, total: int) -> None:
    if progress:
        progress(f"planned {done} of {total} options")


def _in_processes(jobs: int, calls: list[tuple], progress: Callable[[str], None] | None) -> list[HardwareOption]:
    """The options in worker processes, forked where the OS can (the package is loaded once, before)."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=context) as pool:
        futures = [pool.submit(_plan_option, *call) for call in calls]
        options = []
        for done, future in enumerate(futures, 1):
            options.append(future.result())
            _report(progress, done, len(calls))
    return options


def _reachable(address: str) -> None:
    """A cluster's head answers on its port, or one line now (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise UsageError(f"--ray-address {address}: cannot join the Ray cluster ({err})") from None


def _on_ray(address: str, calls: list[tuple], progress: Callable[[str], None] | None) -> list[HardwareOption]:
    """One Ray task per option on an existing cluster (every node needs infer-plan with the ray and hardware
    extras); a cluster that cannot be reached is one line."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray-address needs Ray: pip install 'infer-plan[ray]'") from None
    _reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UsageError(f"--ray-address {address}: cannot join the Ray cluster ({err})") from None
    try:
        task = ray.remote(num_cpus=1)(_plan_option)
        pending = {task.remote(*call): i for i, call in enumerate(calls)}
        options: list[HardwareOption | None] = [None] * len(calls)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            options[pending.pop(ready[0])] = ray.get(ready[0])
            _report(progress, len(calls) - len(pending), len(calls))
        return [o for o in options if o is not None]
    finally:
        ray.shutdown()


def with_prices(search: HardwareSearch, path: Path | None) -> HardwareSearch:
    if path is None:
        return search
    prices, source = load_prices(path)
    return replace(search, prices=prices, prices_source=source)
