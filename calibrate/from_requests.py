"""Calibrating a continuous engine from traffic: a load test's saved requests, nothing sent (SPEC section 12).

``loadtest --save-requests FILE`` keeps, per request, when it was sent, when its first
token and its end came, and its prompt and output lengths. That is enough to fit the
continuous model's terms without one special request:

1. **Steps, from each request's decode.** Between its first token and its last, a
   request of ``o`` tokens sat through ``o - 1`` steps. Each step costs
   ``decode_step + per_seq x (sequences in it) + prefill_per_token x (tokens it
   prefilled) + admit x (requests it admitted)``; summed over those steps, ``sum N`` is
   every token any request received in that window (each sequence gets one per step: a
   request's tokens are taken as evenly spaced between its first and its last), ``sum
   P`` the prompts of the requests whose first token came in it and ``J`` their count.
   So ``decode time = (o - 1) x decode_step + per_seq x sum N + prefill_per_token x sum P
   + admit x J``: one linear row per request, fitted by non-negative least squares. The
   admission host time is held at the base model's (``--profile``, e.g. a streamed
   calibration's; 0 without one), not fitted: in traffic a request's admission comes
   with its prompt's prefill and its share of the steps, so it trades off against them
   along a valley of equally good fits (seen here: admission 6 to 16 ms with equal
   residuals on 190 requests of a server whose truth was 10; held at the truth, the other
   terms came within 3%).
2. **The fit's bias, removed by replay; the overheads, from the TTFTs.** Counting
   tokens as evenly spaced biases that fit (the prefill's cost goes to the per-sequence
   term). The simulator replays the same sends and lengths with the current terms, its
   requests are fitted the same way, and the terms move by the difference between the
   run's fit and the replay's, until the replay fits as the run did; what each replay
   leaves of each measured TTFT is the engine's overhead, fitted as ``request_overhead +
   tokenize x prompt`` (a robust fit: one request held up by a busy client moves no
   term; with prompts of one length the per-token part is the base model's). Twelve
   rounds, the last six averaged (:func:`fit_requests`).

An answer whose tokens all reached the client at once (``SavedRequests.merged``: an engine
front end or a client short of CPU holds a stream, then sends it whole) timed neither its
decode nor its first token: it is replayed, as it held the engine, but not fitted; a run
of mostly such answers is refused.

As with streamed calibration, a per-token streaming cost is inside ``decode_step_ms``.
The TTFT and the decode time measured at the client include the network and client
time, which the fit counts as the engine's: measure close to the engine.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UsageError
from ..core.model import Batching, ServiceModel
from ..core.schema import CalibrationResult, StreamCell
from ..core.stats import BURST_GAP_S
from ..core.tiers import Tier
from .streamed import ContinuousFit, nnls_relative

if TYPE_CHECKING:
    from .run import CalibrationSpec

__all__ = ["SavedRequests", "fit_requests", "read_saved_requests", "run_from_requests"]

MIN_REQUESTS = 20  # answered requests of two tokens or more needed for a fit
MAX_MERGED_SHARE = 0.5  # answers that came whole (SavedRequests.merged) beyond which a run is not fitted
RUN_GAP_S = 60.0  # idle time laid between the runs of several files, longer than any request's stay
FIT_ROUNDS = 12  # replay rounds (fit_requests), one replay of the saved run each
KEPT_ROUNDS = 6  # the last rounds, averaged into the fit
PROMPT_SPREAD = 0.1  # prompts' standard deviation over their mean below which tokenisation per token is held
STEP_TERMS = ("decode_step_ms", "decode_ms_per_seq", "prefill_ms_per_token", "admit_ms_per_request")  # decode_rows
_BLOCK = 512  # rows of the window-count table built at once (memory: _BLOCK x requests floats)


class SavedRequests:
    """The answered, streamed requests of a saved run, in seconds, sorted by send time."""

    def __init__(self, sent: np.ndarray, first: np.ndarray, done: np.ndarray, tiers: np.ndarray,
                 prompt: np.ndarray, output: np.ndarray) -> None:  # fmt: skip
        order = np.argsort(sent, kind="stable")
        self.sent, self.first, self.done = sent[order], first[order], done[order]
        self.tiers, self.prompt, self.output = tiers[order], prompt[order], output[order]

    def __len__(self) -> int:
        return int(self.sent.size)

    @property
    def merged(self) -> np.ndarray:
        """Requests whose tokens all reached the client at once (:data:`BURST_GAP_S` apart or less): the engine's
        front end or the client fell behind, so neither their decode nor their first token timed the engine."""
        return (self.output >= 2) & (self.done - self.first < BURST_GAP_S * (self.output - 1))

    @property
    def timed(self) -> np.ndarray:
        """Requests whose decode the client timed: two tokens or more, not merged."""
        return (self.output >= 2) & ~self.merged

    def decode_start(self) -> np.ndarray:
        """Each request's first token as the engine made it: as received, or for a merged answer its last token
        less its other tokens at the timed requests' median pace (they shared its steps)."""
        timed = self.timed
        if not (self.merged.any() and timed.any()):
            return self.first
        pace = float(np.median((self.done - self.first)[timed] / (self.output[timed] - 1)))
        return np.where(self.merged, np.maximum(self.sent, self.done - pace * (self.output - 1)), self.first)


def read_saved_requests(paths: Path | list[Path]) -> SavedRequests:
    """The rows of one or more ``--save-requests`` CSVs that a fit can use: answered (ok), with a first token and
    lengths.

    Each file is a run with its own clock (a sweep keeps one per step). Several are laid end to end, each
    starting ``RUN_GAP_S`` after the last answer of the one before, so the replay drains the engine between
    them: one fit then spans every load they ran at, which a single rate's run cannot (fitted at half the knee
    on a busy machine, the per-request host time that a fuller step shares out is charged to every step).
    """
    paths = [paths] if isinstance(paths, Path) else paths
    columns: list[np.ndarray] = []
    end: float | None = None  # the last answer of the runs laid so far
    for path in paths:
        run = _read_run(path)
        if run.shape[1]:
            if end is not None:
                run[:3] += end + RUN_GAP_S - float(run[0].min())
            end = float(run[2].max())
        columns.append(run)
    runs = np.concatenate(columns, axis=1)
    if runs.shape[1] < MIN_REQUESTS:
        named = ", ".join(map(str, paths))
        raise UsageError(f"{named} holds {runs.shape[1]} answered streamed requests; a fit needs {MIN_REQUESTS} "
                         "(a streamed load test: --stream --save-requests FILE)", field="requests_file")  # fmt: skip
    sent, first, done, tiers, prompt, output = runs
    req = SavedRequests(sent, first, done, tiers.astype(np.int8), prompt.astype(np.int64), output.astype(np.int64))
    if (merged := int(req.merged.sum())) > MAX_MERGED_SHARE * int((req.output >= 2).sum()):
        raise UsageError(f"{merged} of the {int((req.output >= 2).sum())} answers of two tokens or more reached the "
                         "client whole, every token at once: the engine's front end or the client was short of CPU, "
                         "so these times are not the engine's (measure again on a quieter host, or at a lower rate)",
                         field="requests_file")  # fmt: skip
    return req


def _read_run(path: Path) -> np.ndarray:
    """One CSV's usable rows as columns: sent, first token, finished (s), tier, prompt and output tokens."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}", field="requests_file") from None
    need = {"scheduled_s", "finished_s", "tier", "outcome", "first_token_s", "prompt_tokens", "output_tokens"}
    if not rows or not need <= set(rows[0]):
        raise UsageError(f"{path} is not a --save-requests CSV (its columns: {', '.join(sorted(need))}, sent_s)",
                         field="requests_file")  # fmt: skip
    kept = []
    for line, row in enumerate(rows, start=2):
        if row["outcome"] != "ok" or not row["first_token_s"] or not row["output_tokens"]:
            continue
        try:
            sent = float(row.get("sent_s") or row["scheduled_s"])
            kept.append((sent, float(row["first_token_s"]), float(row["finished_s"]), int(Tier.parse(row["tier"])),
                         int(row["prompt_tokens"]), int(row["output_tokens"])))  # fmt: skip
        except (ValueError, KeyError) as err:
            raise UsageError(f"{path}:{line}: {err}", field="requests_file") from None
    return np.array(kept, dtype=np.float64).reshape(-1, 6).T


def _tokens_received_by(req: SavedRequests, first: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``[i, j]``: tokens request j had been given by time ``at[i]`` (its tokens evenly spaced, ``first`` to last)."""
    o = req.output.astype(np.float64)
    span = np.maximum(req.done - first, 1e-12)
    k = np.floor((at[:, None] - first[None, :]) * (np.maximum(o - 1, 1.0) / span)[None, :]) + 1
    return np.clip(k, 0, o[None, :])


def step_tolerance_s(req: SavedRequests) -> float:
    """Half the timed requests' median token gap: tokens of one step reach the client some milliseconds apart
    (the engine sends them one by one, the client reads them one by one), so two times closer than this are
    taken as one step's (:func:`decode_rows`)."""
    timed = req.timed
    if not timed.any():
        return 0.0
    return 0.5 * float(np.median((req.done - req.first)[timed] / (req.output[timed] - 1)))


def decode_rows(req: SavedRequests, rows: np.ndarray, tolerance_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the module docstring: per request of ``rows``, ``[o - 1, sum N, sum P, J]``, its decode time (ms).

    Request i's decode steps are those ending in ``(first_i, done_i]``; each end is moved ``tolerance_s`` later,
    so a request whose first token came in i's first token's step (a few ms after it, as read) is not counted as
    joining in i's decode, and one whose first token came in i's last step (a few ms before it) is. Without it
    such ties fell either way in a measured run and one way in its replay (a step's tokens come at one instant
    there), and :func:`fit_requests` could not match the two: with 3 ms of jitter on each time its prefill term
    came out up to 23% off on simulated runs, with it 5%.
    """
    first = req.decode_start()
    design = np.empty((rows.size, 4))
    for lo in range(0, rows.size, _BLOCK):
        i = rows[lo : lo + _BLOCK]
        opens, closes = first[i] + tolerance_s, req.done[i] + tolerance_s
        tokens = _tokens_received_by(req, first, closes) - _tokens_received_by(req, first, opens)
        joined = (first[None, :] > opens[:, None]) & (first[None, :] <= closes[:, None])
        design[lo : lo + i.size] = np.column_stack(
            [req.output[i] - 1, tokens.sum(axis=1), (joined * req.prompt[None, :]).sum(axis=1), joined.sum(axis=1)]
        )
    return design, (req.done[rows] - req.first[rows]) * 1000.0


def _replay(model: ServiceModel, req: SavedRequests) -> SavedRequests:
    """The same sends and lengths simulated with ``model``, as saved requests (every one answered and timed)."""
    from ..sim.engines.engine import simulate_arrivals
    from ..sim.inputs.arrivals import Arrivals

    arrivals = Arrivals(times=req.sent - req.sent[0], tiers=req.tiers, prompt_tokens=req.prompt.astype(np.int32),
                        output_tokens=req.output.astype(np.int32))  # fmt: skip
    # Every saved request was answered, so the replay sheds none: a trial whose steps are too slow then shows as
    # long times the fit moves away from, not as requests without times (a 429'd request's are NaN).
    unshed = model.backpressure.model_copy(update={"queue_limit": 2 * len(req) + 2})
    records = simulate_arrivals(model.model_copy(update={"backpressure": unshed}), arrivals, gpus=1).records
    if not (np.isfinite(records.first_token).all() and np.isfinite(records.finished).all()):
        raise UsageError(
            "the replay of these requests left some unanswered, so nothing can be fitted: "
            "check that the files are one engine's runs (calibrate --from-requests, docs/calibration.md)"
        )
    return SavedRequests(req.sent, records.first_token + req.sent[0], records.finished + req.sent[0], req.tiers,
                         req.prompt, req.output)  # fmt: skip


def fit_requests(req: SavedRequests, model: ServiceModel) -> ContinuousFit:
    """The step terms that make a replay's decode rows fit as the run's did, and the overheads its TTFTs show.

    The linear fit of :func:`decode_rows` is biased: counting each request's tokens as
    evenly spaced lends a step with a prefill fewer tokens than it had, so the prefill's
    cost goes to the per-sequence term (the prefill 12-25% low on simulated runs of known terms).
    The replay knows that bias: each round replays the run with the current terms, fits
    the replay's rows the same way, and moves the terms by the difference between the
    run's fit and the replay's (indirect inference: the terms whose replay fits as the
    run did). Each round also fits the overheads, robustly, to what the replay leaves of
    each measured TTFT. A replay moves requests by whole steps as the terms change, so
    the rounds jitter about the answer: the mean of the later rounds is kept. On eight
    simulated runs of the test's engine the step terms came within 1.8% (exact times)
    and 2.4% (3 ms of jitter on each time); ten rounds of Gauss-Newton on the replayed
    decode times, fitted before, were up to 6.6% and 13.8% off the prefill term (a
    replay's per-request residual is too rough for a local method).
    """
    from scipy.optimize import least_squares  # loads on use

    timed, answered = np.flatnonzero(req.timed), ~req.merged  # a merged answer's first token came with its last
    tolerance_s = step_tolerance_s(req)
    held = STEP_TERMS.index("admit_ms_per_request")  # at the base model's value (module docstring)
    free = [k for k in range(len(STEP_TERMS)) if k != held]
    steps = np.array([getattr(model, name) for name in STEP_TERMS], dtype=float)

    def linear_fit(saved: SavedRequests) -> np.ndarray:
        design, decode_ms = decode_rows(saved, timed, tolerance_s)
        return nnls_relative(design[:, free], decode_ms - steps[held] * design[:, held])

    measured = linear_fit(req)
    steps[free] = measured
    measured_ttft = (req.first - req.sent)[answered] * 1000.0
    overhead = np.column_stack([np.ones(len(req)), req.prompt])[answered]
    alpha = np.array([0.0, model.tokenize_ms_per_token])
    # Prompts of (nearly) one length cannot tell the per-token part of the overhead from the fixed part: the
    # base model's per-token cost is held then, and only the fixed part fitted.
    per_token_free = float(np.std(req.prompt)) > PROMPT_SPREAD * float(np.mean(req.prompt))
    fitted = slice(None) if per_token_free else slice(0, 1)
    rounds: list[np.ndarray] = []
    for _ in range(FIT_ROUNDS):
        replay = _replay(_with_terms(model, steps, alpha), req)
        target = measured_ttft - (replay.first - replay.sent)[answered] * 1000.0 + overhead @ alpha
        if not per_token_free:
            target -= alpha[1] * overhead[:, 1]
        start = np.maximum(alpha, [1e-3, 1e-6])[fitted]  # strictly inside the bounds: the solver stalls on one
        # A robust loss: a request delayed by a busy client or machine must not move every request's overhead.
        alpha[fitted] = least_squares(lambda x, t=target, d=overhead[:, fitted]: d @ x - t, start,
                                      bounds=(0.0, np.inf), loss="soft_l1", f_scale=1.0).x  # fmt: skip
        steps[free] = np.maximum(steps[free] + measured - linear_fit(replay), 0.0)
        rounds.append(np.concatenate([steps, alpha]))
    kept = np.mean(rounds[-KEPT_ROUNDS:], axis=0)
    steps, alpha = kept[: len(STEP_TERMS)], kept[len(STEP_TERMS) :]
    replay = _replay(_with_terms(model, steps, alpha), req)
    replay_ttft, replay_decode = (replay.first - replay.sent) * 1000.0, (replay.done - replay.first) * 1000.0
    cells = [
        _cell("traffic_ttft", measured_ttft, replay_ttft[answered], req.prompt[answered]),
        _cell("traffic_decode", (req.done - req.first)[timed] * 1000.0, replay_decode[timed], req.prompt[timed]),
    ]
    return _fit_of(model, steps, alpha, cells)


def _fit_of(model: ServiceModel, steps: np.ndarray, alpha: np.ndarray, cells: list[StreamCell]) -> ContinuousFit:
    """The fit from the step terms (in ``STEP_TERMS`` order) and the overheads; the base's step spread kept."""
    a, b, c, admit = (float(x) for x in steps)
    return ContinuousFit(a, b, c, float(alpha[0]), float(alpha[1]), cells, admit_ms_per_request=admit,
                         step_jitter=model.cycle_jitter, idle_wake_ms=model.idle_wake_ms)  # fmt: skip


def _with_terms(model: ServiceModel, steps: np.ndarray, alpha: np.ndarray) -> ServiceModel:
    return model.model_copy(update={"batching": Batching.CONTINUOUS, **_fit_of(model, steps, alpha, []).terms()})


def _cell(kind: str, measured: np.ndarray, fitted: np.ndarray, size: np.ndarray) -> StreamCell:
    """One summary row of a traffic fit: the median measured and fitted time over the requests."""
    return StreamCell(kind=kind, sequences=0, prefill_tokens=int(np.median(size)), samples=int(measured.size),
                      median_ms=float(np.median(measured)), p95_ms=float(np.percentile(measured, 95)),
                      fitted_ms=float(np.median(fitted)))  # fmt: skip


def run_from_requests(spec: CalibrationSpec) -> CalibrationResult:
    """``calibrate --from-requests FILE``: fit the saved run, write the profile, return the result."""
    import datetime as dt

    from .profile import continuous_profile_toml
    from .run import continuous_result, resolve_limits, write_profile

    assert spec.requests_files
    req = read_saved_requests(spec.requests_files)
    model = spec.model.model_copy(update={"batching": Batching.CONTINUOUS, **spec.limits})
    limits, sources = resolve_limits(spec.limits, {}, model)
    fit = fit_requests(req, model.model_copy(update=limits))
    evidence = {
        "kind": "measured",
        "method": "a load test's saved requests (calibrate/from_requests.py): decode times, then TTFTs by replay",
        "requests_files": [str(path) for path in spec.requests_files],
        "requests": len(req),
        "merged_requests": int(req.merged.sum()),  # answers that came whole: replayed, not fitted
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "limit_sources": sources,
    }
    write_profile(spec.out, continuous_profile_toml(fit.terms(), limits, evidence))
    return continuous_result(spec, fit, limits, sources, mode="requests", repetitions=len(req))
