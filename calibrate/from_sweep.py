"""``calibrate --from-sweep``: correct a profile so that its simulated knee is the knee a sweep measured.

A profile fitted elsewhere (another machine, an aiconfigurator estimate, last month's
engine) predicts the right shape of a replica's latency but often the wrong speed. The
correction is one factor on every engine time term (the step terms, the per-request
overheads, the per-token output cost, and a static batch's phases), found by bisection
on its logarithm until the simulated knee (:func:`~..sim.planning.knee.slo_knee_rps`,
the sweep's workload, SLOs and step length) is within 2% of the measured knee. One
factor keeps what the profile got right (how prefill and decode trade off) and moves
only what a knee can tell: how fast the engine is overall. The limits (sequences,
batched tokens, KV) are left as they are.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import tomli_w

from ..core.errors import ConfigError
from ..core.model import ServiceModel
from ..core.schema import CalibrationResult, KneeFit, SweepResult, load_result
from ..core.slos import Slos
from ..sim.inputs.workload import Workload
from ..sim.planning.knee import slo_knee_rps
from ..sim.runner import RunSettings
from .run import write_profile

__all__ = ["ENGINE_TIME_TERMS", "calibrate_from_sweep", "load_sweep", "scaled"]

ENGINE_TIME_TERMS = (
    "decode_step_ms", "prefill_ms_per_token", "decode_ms_per_seq", "admit_ms_per_request", "request_overhead_ms",
    "tokenize_ms_per_token", "output_token_ms", "pcie_in_ms", "kernel_ms", "pcie_out_ms", "per_item_ms",
)  # fmt: skip
TOLERANCE = 0.02
MAX_SIMULATIONS = 16
REPLICATIONS = 10


def calibrate_from_sweep(sweep_path: Path, profile: Path, model: ServiceModel, out: Path) -> CalibrationResult:
    """Scale ``model``'s engine times to the sweep's knee; write ``profile`` so corrected to ``out``."""
    sweep = load_sweep(sweep_path)
    if not sweep.workload:
        raise ConfigError(f"{sweep_path}: the sweep does not record its workload; run it again with this infer-plan")
    assert sweep.knee_rps is not None
    measured = sweep.knee_rps
    model = model.model_copy(update={"slos": Slos(**sweep.slos)})
    workload = Workload.model_validate(sweep.workload)
    settings = RunSettings(duration_s=sweep.longest_step_s, warmup_s=sweep.warmup_s, replications=REPLICATIONS)
    gpus = sweep.gpus or 1
    runs = 0

    def knee(factor: float) -> float | None:
        nonlocal runs
        runs += 1
        return slo_knee_rps(scaled(model, factor), workload, gpus, settings, resolution=TOLERANCE / 2)

    before = knee(1.0)
    low, high = 1 / 8, 8.0  # log-bisection bounds on the factor; a slower engine (larger factor) has a lower knee
    factor, after = 1.0, before
    while not _close(after, measured) and runs < MAX_SIMULATIONS:
        if after is None or after < measured:
            high = factor
        else:
            low = factor
        factor = math.sqrt(low * high)
        after = knee(factor)
    fit = KneeFit(sweep=str(sweep_path), measured_knee_rps=measured, simulated_before_rps=before,
                  simulated_after_rps=after, factor=factor, simulations=runs)  # fmt: skip
    terms = scaled(model, factor)
    write_profile(out, _corrected_profile(profile, terms, fit))
    error = abs(after - measured) / measured if after is not None else 1.0
    return CalibrationResult(
        backend="sweep", model=None, repetitions=0, warmup_batches=0, points=[], fixed_ms=0.0, per_item_ms=0.0,
        decode_step_ms=terms.decode_step_ms, prefill_ms_per_token=terms.prefill_ms_per_token,
        decode_ms_per_seq=terms.decode_ms_per_seq, max_relative_error=error, mean_relative_error=error,
        profile_path=str(out), mode="sweep", request_overhead_ms=terms.request_overhead_ms,
        tokenize_ms_per_token=terms.tokenize_ms_per_token, admit_ms_per_request=terms.admit_ms_per_request,
        knee_fit=fit,
    )  # fmt: skip


def load_sweep(path: Path) -> SweepResult:
    """A saved ``loadtest --sweep`` result that measured a knee (one line otherwise)."""
    result = load_result(path)
    if not isinstance(result, SweepResult):
        raise ConfigError(f"{path}: a loadtest --sweep result is needed, not a {result.kind} result")
    if result.knee_rps is None:
        raise ConfigError(f"{path}: the sweep measured no knee ({result.message})")
    return result


def scaled(model: ServiceModel, factor: float) -> ServiceModel:
    """The model with every engine time term multiplied by ``factor``."""
    return model.model_copy(update={name: getattr(model, name) * factor for name in ENGINE_TIME_TERMS})


def _close(knee: float | None, measured: float) -> bool:
    return knee is not None and abs(knee - measured) <= TOLERANCE * measured


def _corrected_profile(path: Path, terms: ServiceModel, fit: KneeFit) -> str:
    """The profile file's tables with its [service] time terms scaled (every one in play, written out, the
    model's defaults included) and the correction recorded in [profile]."""
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the profile ({err})") from None
    service = dict(tables.get("service", {}))
    for name in ENGINE_TIME_TERMS:
        if name in service or getattr(terms, name):
            service[name] = round(float(getattr(terms, name)), 7)
    evidence = {**tables.get("profile", {}), "corrected_from_sweep": fit.model_dump(exclude_none=True)}
    header = (
        f"# {path.name} with every engine time term x {fit.factor:.4f}, written by\n"
        f"# `infer-plan calibrate --from-sweep`: its simulated knee is then {fit.simulated_after_rps or 0:,.2f}\n"
        f"# req/s, the sweep measured {fit.measured_knee_rps:,.2f}.\n"
    )
    return header + tomli_w.dumps({**tables, "service": service, "profile": evidence})
