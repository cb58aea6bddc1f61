"""The capacity planner: the smallest GPU count that meets every constraint.

The back-of-envelope arithmetic (:func:`back_of_envelope`) gives a lower bound and the
starting point; the simulation is the authority. Constraints are monotone in the GPU
count (more GPUs never raise load, latency or rejects in this model), so the search
walks up from the arithmetic's answer, doubling its step until a count passes, then
bisects back to the smallest passing one.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from ...core.errors import SimulationError
from ...core.model import Batching, ServiceModel, TokenShape
from ...core.schema import BackOfEnvelope, CapacityResult, CapacityRow, SimulationResult, SweepPoint
from ...core.slos import Observed, Scope, check_slos
from ...core.tiers import Tier
from ..engines.compiled_steps import compiled_applies, load_compiled
from ..inputs.workload import Workload
from ..results.tally import Watch
from ..runner import RunSettings, check_run_size, default_watch, run_simulation

__all__ = ["back_of_envelope", "failures", "observed", "plan_batching_modes", "plan_capacity", "sweep_capacity"]

ProgressFn = Callable[[str], None]


def failures(model: ServiceModel, result: SimulationResult) -> list[str]:
    """The names of the gates a simulated GPU count fails: each SLO (:func:`~..core.slos.check_slos`), and the
    load ceiling (``load``), which is a planning margin, not an objective."""
    failed = [gate.name for gate in check_slos(model.slos, observed(result)) if not gate.passed]
    if result.load_factor > model.max_load + 1e-9:
        failed.append("load")
    return failed


def observed(result: SimulationResult) -> Observed:
    """A simulation's figures as the SLO check reads them: overall, then each tier."""
    scopes = [Scope("overall", result, result, result.requests)]
    scopes += [Scope(tier, stats, stats, stats.requests) for tier, stats in result.per_tier.items()]
    return Observed(scopes, result.error_fraction, result.rejected_fraction, "the model simulates no tokens")


def back_of_envelope(model: ServiceModel, rps: float, shape: TokenShape | None = None) -> BackOfEnvelope:
    """The design's arithmetic: per-GPU throughput, raw GPUs, GPUs at the load ceiling.

    With tokens in play (``shape``: the workload's mean lengths) the cycle includes a
    batch's steps, or, for continuous batching, per-GPU throughput is the GPU time one
    request costs at the step formula.
    """
    per_gpu = model.per_gpu_rps(shape)
    raw = rps / per_gpu
    # A tiny tolerance so that an exact multiple (e.g. 1.5 / 0.75 = 2) is not rounded up by float noise.
    at_ceiling = max(1, math.ceil(raw / model.max_load - 1e-9))
    if model.batching is Batching.CONTINUOUS and shape is not None:
        cycle, lines = _continuous_arithmetic(model, shape, per_gpu)
    else:
        cycle, lines = _static_arithmetic(model, shape, per_gpu)
    lines += [
        f"raw GPUs = {rps:,.0f} / {_rate(per_gpu)} = {raw:.2f}",
        f"at the {model.max_load:.0%} ceiling = ceil({raw:.2f} / {model.max_load:g}) = ceil({raw / model.max_load:.2f})"
        f" = {at_ceiling}",
    ]
    return BackOfEnvelope(
        cycle_ms=cycle,
        per_gpu_rps=per_gpu,
        tokens_per_s_per_gpu=per_gpu * shape.output_tokens if shape is not None else None,
        raw_gpus=raw,
        gpus_at_ceiling=at_ceiling,
        max_load=model.max_load,
        arithmetic=lines,
    )


def _rate(per_gpu: float) -> str:
    """Whole requests/s where that is precise enough (909), a decimal below 100 (80.1)."""
    return f"{per_gpu:,.0f}" if per_gpu >= 100 else f"{per_gpu:,.1f}"


def _static_arithmetic(model: ServiceModel, shape: TokenShape | None, per_gpu: float) -> tuple[float, list[str]]:
    b = model.max_batch
    parts = f"{model.pcie_in_ms:g} + {model.kernel_ms:g} + {model.pcie_out_ms:g}"
    if model.per_item_ms:
        parts += f" + {model.per_item_ms:g} x {b}"
    if not model.overlap:
        parts = f"{model.max_wait_ms:g} (assembly holds the GPU) + " + parts
    cycle = model.gpu_cycle_ms()
    lines = []
    if shape is not None and model.tokens_modelled:
        p, o = shape.prompt_tokens, shape.output_tokens
        steps = model.token_batch_ms(b, shape) * model.jitter_mean
        lines.append(
            f"steps of a full batch = prefill ({model.decode_step_ms:g} + {model.prefill_ms_per_token:g} x {b} x {p:g}"
            f" + {model.decode_ms_per_seq:g} x {b}) + {o - 1:g} decode steps x ({model.decode_step_ms:g} + "
            f"{model.decode_ms_per_seq:g} x {b}) = {steps:,.1f} ms"
        )
        parts += f" + {steps:,.1f} (steps)"
        cycle += steps
    lines.insert(0, f"cycle = {parts} = {cycle:,.4g} ms per batch of up to {b}")
    lines.append(f"per-GPU throughput = {b} / {cycle / 1000:,.4g} s = {_rate(per_gpu)} req/s")
    return cycle, lines


def _continuous_arithmetic(model: ServiceModel, shape: TokenShape, per_gpu: float) -> tuple[float, list[str]]:
    p, o = shape.prompt_tokens, shape.output_tokens
    seqs = model.concurrent_sequences(shape)
    kv = (
        f", KV {model.kv_cache_tokens:,} / ({p:g} + {o:g}) = {model.kv_cache_tokens // (p + o):,.0f}"
        if model.kv_cache_tokens is not None
        else ""
    )
    step = model.step_ms(0, seqs)
    fill = p - shape.cached_tokens
    prefill = model.prefill_ms_per_token * fill + model.admit_ms_per_request
    prefilled = f"({p:g} - {shape.cached_tokens:,.4g} cached)" if shape.cached_tokens else f"{p:g}"
    decode = o * (model.decode_step_ms / seqs + model.decode_ms_per_seq)
    admit = f" + admission {model.admit_ms_per_request:g}" if model.admit_ms_per_request else ""
    spread = f"(mean step spread {model.jitter_mean:.3f} x " if model.cycle_jitter else "("
    lines = [
        f"sequences per GPU S = min(max_num_seqs {model.max_num_seqs}{kv}) = {seqs:,.0f}",
        f"decode step of S = {model.decode_step_ms:g} + {model.decode_ms_per_seq:g} x {seqs:,.0f} = {step:,.3f} ms: "
        f"{seqs / step * 1000 if step else math.inf:,.0f} tokens/s per GPU while only decoding",
        f"GPU time per request = prefill {prefilled} x {model.prefill_ms_per_token:g}{admit} = {prefill:,.3f} ms + "
        f"{o:g} tokens x "
        f"({model.decode_step_ms:g} / {seqs:,.0f} + {model.decode_ms_per_seq:g}) = {decode:,.3f} ms",
        f"per-GPU throughput = 1000 / {spread}{prefill + decode:,.3f} ms) = {_rate(per_gpu)} req/s "
        f"({per_gpu * o:,.0f} output tokens/s)",
    ]
    if model.engine_overheads:  # latency the engine adds outside its steps: in every TTFT, no GPU time
        lines.append(
            f"engine overheads (no GPU time): {model.request_overhead_ms:g} + {model.tokenize_ms_per_token:g} x {p:g}"
            f" = {model.admission_delay_ms(p):,.3f} ms before a request's first step, {model.output_token_ms:g} ms "
            "per streamed token"
        )
    return step, lines


def _row(gpus: int, result: SimulationResult, model: ServiceModel) -> CapacityRow:
    failed = failures(model, result)
    return CapacityRow(
        gpus=gpus,
        meets=not failed,
        failed=failed,
        p95_ms=result.p95_ms,
        ttft_p95_ms=result.ttft_p95_ms,
        itl_p95_ms=result.itl_p95_ms,
        per_tier_p95_ms={t: s.p95_ms for t, s in result.per_tier.items()},
        load_factor=result.load_factor,
        gpu_busy=result.gpu_busy,
        rejected_fraction=result.rejected_fraction,
        error_fraction=result.error_fraction,
    )


def _simulate(
    model: ServiceModel, workload: Workload, settings: RunSettings, gpus: int, watch: tuple[Watch, ...]
) -> SimulationResult:
    """One GPU count's run (a worker process's job: a module-level function, so it pickles)."""
    return run_simulation(model, workload, settings, gpus, keep_timeseries=False, watch=watch)


class _Evaluator:
    """Simulates each GPU count once, with the same arrivals (same seed) for all counts.

    With a process pool, counts the search will likely ask for next are started ahead
    (:meth:`prefetch`), so ``jobs`` simulations run at once and the search waits only
    for the one it needs.
    """

    def __init__(
        self,
        model: ServiceModel,
        workload: Workload,
        settings: RunSettings,
        progress: ProgressFn | None,
        pool: Executor | None = None,
    ) -> None:
        self.model, self.workload, self.settings = model, workload, settings
        self.progress = progress
        self.pool = pool
        self.watch = default_watch(model)
        self.results: dict[int, SimulationResult] = {}
        self.futures: dict[int, Future[SimulationResult]] = {}

    def prefetch(self, counts: Iterable[int]) -> None:
        if self.pool is None:
            return
        for gpus in counts:
            if gpus >= 1 and gpus not in self.results and gpus not in self.futures:
                if self.progress:
                    self.progress(f"simulating {gpus} GPUs")
                args = (self.model, self.workload, self.settings, gpus, self.watch)
                self.futures[gpus] = self.pool.submit(_simulate, *args)

    def __call__(self, gpus: int) -> SimulationResult:
        if gpus not in self.results:
            if self.pool is not None:
                self.prefetch([gpus])
                self.results[gpus] = self.futures.pop(gpus).result()
            else:
                if self.progress:
                    self.progress(f"simulating {gpus} GPUs")
                self.results[gpus] = _simulate(self.model, self.workload, self.settings, gpus, self.watch)
        return self.results[gpus]

    def meets(self, gpus: int) -> bool:
        self.prefetch([gpus, gpus + 1])  # the gallop's next step, or the table's neighbour
        return not failures(self.model, self(gpus))

    def cancel(self) -> None:
        """Drop speculative runs nobody asked for."""
        for future in self.futures.values():
            future.cancel()

    @property
    def simulated(self) -> int:
        return len(self.results)


def _smallest_passing(meets: Callable[[int], bool], start: int, limit: int) -> int | None:
    """Gallop up from ``start`` (steps 1, 2, 4, ...) to a passing count, then bisect down."""
    low_fail, candidate, step = start - 1, start, 1
    while not meets(candidate):
        low_fail = candidate
        if candidate >= limit:
            return None
        candidate = min(limit, candidate + step)
        step *= 2
    high_pass = candidate
    while high_pass - low_fail > 1:
        mid = (high_pass + low_fail) // 2
        if meets(mid):
            high_pass = mid
        else:
            low_fail = mid
    return high_pass


def plan_capacity(
    model: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    *,
    max_gpus: int | None = None,
    neighbours: int = 2,
    sweep_rates: list[float] | None = None,
    progress: ProgressFn | None = None,
    jobs: int = 1,
) -> CapacityResult:
    """Search the smallest GPU count meeting the model's SLOs and load ceiling, simulate its neighbours.

    With ``sweep_rates``, the same search at each rate gives the GPUs-versus-rps curve.
    ``jobs`` > 1 runs that many simulations at once in worker processes.
    """
    for rps in [workload.schedule.rps, *(sweep_rates or ())]:  # the search starts at the arithmetic's count
        at_rate = workload.at_rate(rps)
        envelope = back_of_envelope(model, rps * at_rate.requests_per_arrival, at_rate.shape(model))  # with turns
        check_run_size(model, at_rate, settings, envelope.gpus_at_ceiling)
    if jobs > 1 and model.batching is Batching.CONTINUOUS and compiled_applies(model):
        load_compiled()  # once, before the workers fork
    with _pool(jobs) as pool:
        return _plan(model, workload, settings, max_gpus, neighbours, sweep_rates, progress, pool, jobs)


@contextmanager
def _pool(jobs: int) -> Iterator[Executor | None]:
    """Worker processes for ``jobs`` > 1. Forked where the OS can (no re-import), else spawned.

    A worker that dies (the OS's out-of-memory killer, a signal) breaks the pool: that is one line for the
    user, with what to try, not a traceback.
    """
    if jobs <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    try:
        yield pool
    except BrokenProcessPool:
        raise SimulationError(
            "a simulation worker process died (out of memory?); try --jobs 1, a shorter --duration, or --precision"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _plan(
    model: ServiceModel,
    workload: Workload,
    settings: RunSettings,
    max_gpus: int | None,
    neighbours: int,
    sweep_rates: list[float] | None,
    progress: ProgressFn | None,
    pool: Executor | None,
    jobs: int,
) -> CapacityResult:
    rps = workload.schedule.rps * workload.requests_per_arrival  # requests: a session brings its turns
    envelope = back_of_envelope(model, rps, workload.shape(model))
    # The load ceiling is arithmetic (load_factor is defined by the offered rate), so no
    # count below ceil(raw / max_load) can pass; start the simulated search there.
    start = max(1, envelope.gpus_at_ceiling)
    limit = max_gpus if max_gpus is not None else max(4 * start, start + 16)
    evaluate = _Evaluator(model, workload, settings, progress, pool)
    # The arithmetic's count is the likeliest answer: its table row neighbours go first.
    evaluate.prefetch(sorted(range(start - neighbours, start + neighbours + 1), key=lambda g: abs(g - start)))
    best = _smallest_passing(evaluate.meets, start, limit) if start <= limit else None

    centre = best if best is not None else start
    counts = range(max(1, centre - neighbours), centre + neighbours + 1)
    evaluate.prefetch(counts)
    table = [_row(g, evaluate(g), model) for g in counts]
    evaluate.cancel()
    chosen = evaluate(best) if best is not None else None
    binding = _binding_constraint(best, envelope, evaluate, model)
    explanation = _explain(best, envelope, chosen, binding, model)
    return CapacityResult(
        gpus=best,
        rps=rps,
        p95_ms=chosen.p95_ms if chosen else None,
        ttft_p95_ms=chosen.ttft_p95_ms if chosen else None,
        itl_p95_ms=chosen.itl_p95_ms if chosen else None,
        batching=model.batching.value,
        per_tier_p95_ms={t: s.p95_ms for t, s in chosen.per_tier.items()} if chosen else {},
        load_factor=chosen.load_factor if chosen else None,
        gpu_busy=chosen.gpu_busy if chosen else None,
        rejected_fraction=chosen.rejected_fraction if chosen else None,
        binding_constraint=binding,
        constraints={"e2e_p95_ms": model.slos.e2e_p95_ms, "max_load": model.max_load} | model.slos.limits,
        back_of_envelope=envelope,
        explanation=explanation,
        neighbours=table,
        search_limit=limit,
        duration_s=settings.duration_s,
        warmup_s=settings.warmup_for(workload),
        seed=settings.seed,
        overlap=model.overlap,
        precision=chosen.precision if chosen else None,
        simulations=evaluate.simulated,
        jobs=jobs,
        simulated_gpus=chosen.simulated_gpus if chosen else None,
        sweep=_sweep(model, workload, sweep_rates, settings, max_gpus, progress, pool) if sweep_rates else None,
    )


def plan_batching_modes(
    model: ServiceModel,
    modes: list[Batching],
    workload: Workload,
    settings: RunSettings,
    *,
    max_gpus: int | None = None,
    sweep_rates: list[float] | None = None,
    progress: ProgressFn | None = None,
    jobs: int = 1,
) -> CapacityResult:
    """:func:`plan_capacity` under each batching mode given; the first is the answer, the others ride beside it."""
    plans = [
        plan_capacity(
            model.model_copy(update={"batching": mode}),
            workload,
            settings,
            max_gpus=max_gpus,
            sweep_rates=sweep_rates,
            progress=progress,
            jobs=jobs,
        )
        for mode in modes
    ]
    return plans[0].model_copy(update={"alternatives": plans[1:]})


def _binding_constraint(best: int | None, envelope: BackOfEnvelope, evaluate: _Evaluator, model: ServiceModel) -> str:
    if best is None:
        return "none found within the search limit"
    if best == 1:
        return "minimum fleet (one GPU)"
    below = [name for name in failures(model, evaluate(best - 1)) if name != "load"]
    if not below:
        return "load ceiling"
    # One entry per objective, with the scopes it failed in: "ttft_p95 (overall, free)".
    scopes: dict[str, list[str]] = {}
    for name in below:
        metric, _, scope = name.rpartition("_")
        if metric and scope in ("overall", *(t.label for t in Tier)):
            scopes.setdefault(metric, []).append(scope)
        else:
            scopes.setdefault(name, [])
    return ", ".join(f"{m} ({', '.join(s)})" if s else m for m, s in scopes.items())


def _explain(
    best: int | None, envelope: BackOfEnvelope, chosen: SimulationResult | None, binding: str, model: ServiceModel
) -> list[str]:
    if best is None or chosen is None:
        return ["No GPU count up to the search limit met every constraint; raise --max-gpus or relax the SLO."]
    lines = []
    if best == envelope.gpus_at_ceiling:
        lines.append(f"The simulation agrees with the arithmetic: {best} GPUs, bound by the {binding}.")
    else:
        lines.append(
            f"The simulation needs {best} GPUs, {best - envelope.gpus_at_ceiling:+d} against the arithmetic's "
            f"{envelope.gpus_at_ceiling}: the binding constraint is {binding}."
        )
    if model.batching is Batching.CONTINUOUS:
        lines.append(
            f"gpu_busy {chosen.gpu_busy:.0%} vs load_factor {chosen.load_factor:.0%}: a GPU steps whenever it runs"
            f" anything; its steps average {chosen.mean_batch_size:.1f} of {model.max_num_seqs} sequences."
        )
        return lines
    if model.tokens_modelled:
        lines.append(
            f"gpu_busy {chosen.gpu_busy:.0%} vs load_factor {chosen.load_factor:.0%}: batches average"
            f" {chosen.mean_batch_size:.1f} of {model.max_batch}, and each holds its GPU until its longest answer"
            " is done, its finished sequences idle in it."
        )
        return lines
    cycle = model.gpu_cycle_ms(round(chosen.mean_batch_size))
    lines.append(
        f"gpu_busy {chosen.gpu_busy:.0%} vs load_factor {chosen.load_factor:.0%}: batches average"
        f" {chosen.mean_batch_size:.1f} of {model.max_batch}, and a partial batch costs a full {cycle:,.4g} ms cycle."
    )
    return lines


def sweep_capacity(
    model: ServiceModel,
    workload: Workload,
    rates: list[float],
    settings: RunSettings,
    max_gpus: int | None = None,
    progress: ProgressFn | None = None,
    jobs: int = 1,
) -> list[SweepPoint]:
    """The GPUs-versus-rps curve: one capacity search per rate, ``jobs`` rates at once."""
    with _pool(jobs) as pool:
        return _sweep(model, workload, rates, settings, max_gpus, progress, pool)


def _sweep_point(
    model: ServiceModel,
    workload: Workload,
    rps: float,
    settings: RunSettings,
    max_gpus: int | None,
) -> SweepPoint:
    result = plan_capacity(model, workload.at_rate(rps), settings, max_gpus=max_gpus, neighbours=0)
    env = result.back_of_envelope
    return SweepPoint(
        rps=rps, gpus=result.gpus, raw_gpus=env.raw_gpus, gpus_at_ceiling=env.gpus_at_ceiling, p95_ms=result.p95_ms
    )


def _sweep(
    model: ServiceModel,
    workload: Workload,
    rates: list[float],
    settings: RunSettings,
    max_gpus: int | None,
    progress: ProgressFn | None,
    pool: Executor | None,
) -> list[SweepPoint]:
    """Each point's search runs whole in one worker (points are independent); in order without a pool."""
    args = [(model, workload, rps, settings, max_gpus) for rps in rates]
    if progress:
        progress(f"sweeping {len(rates)} rates")
    if pool is None:
        return [_sweep_point(*a) for a in args]
    return [f.result() for f in [pool.submit(_sweep_point, *a) for a in args]]
