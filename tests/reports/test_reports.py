"""Every result kind rendered to Markdown and HTML from its saved JSON, checked for its numbers and plots.

The results come from real runs of the commands (small ones); the HTML pages are opened
in headless Chromium to prove the plots draw, not only that a file was written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from infer_plan.reports.screenshot import dump_dom, screenshot

from tests.helpers import run_cli as cli

pytestmark = pytest.mark.timeout(300)
EXAMPLE_PROFILE = Path(__file__).parents[2] / "examples/profiles/llama-3.1-8b-instruct-h100.toml"
SAVED_REQUESTS = Path(__file__).parents[2] / "examples/saved-requests.csv"  # a streamed load test's requests
TOKEN_KEYS = ("ttft_p95_ms", "itl_p95_ms", "p95_ms")


def ms(value: float) -> str:
    return f"{value:,.1f}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    runs = {
        "simulate": ["simulate", "--rps", "3000", "--gpus", "5", "--duration", "60", "--spike", "2:20:15", "--save"],
        "capacity": ["capacity", "--rps", "3000", "--sweep", "--duration", "30", "--save"],
        "calibrate": [
            "calibrate",
            "--sizes",
            "1,10,50",
            "-n",
            "2",
            "--warmup-batches",
            "0",
            "--out",
            str(out / "p.toml"),
            "--save",
        ],
        "loadtest": ["loadtest", "--target", "sim", "--rps", "100", "--duration", "4", "--json"],
        "simulate-tokens": [
            "simulate", "--profile", str(EXAMPLE_PROFILE), "--gpus", "2", "--rps", "100", "--duration", "30",
            "--prompt-tokens", "lognormal:mean=512,sd=256", "--output-tokens", "64", "--save",
        ],
        "calibrate-tokens": [
            "calibrate", "--sizes", "1,4", "--prompt-tokens", "16,64", "--output-tokens", "1,4", "-n", "1",
            "--warmup-batches", "0", "--out", str(out / "t.toml"), "--save",
        ],
        "calibrate-requests": [
            "calibrate", "--from-requests", str(SAVED_REQUESTS), "--max-num-seqs", "16", "--out", str(out / "r.toml"),
            "--save",
        ],
    }  # fmt: skip
    paths = {}
    for kind, args in runs.items():
        paths[kind] = out / f"{kind}.json"
        done = cli(*args, str(paths[kind]))
        assert done.returncode == 0, (kind, done.stderr[-2000:])
    return paths


FIGURE_TITLES = {
    "simulate": ["End-to-end latency CDF per tier (simulated)", "Over time"],
    "simulate-tokens": [
        "End-to-end latency CDF per tier (simulated)",
        "Time to first token CDF per tier",
        "Inter-token latency CDF per tier",
        "Over time",
    ],
    "calibrate-tokens": ["Batch time per cell, measured versus fitted"],
    "calibrate-requests": ["Streamed cells, measured median versus fitted"],
    "capacity": ["P95 and load versus GPU count", "P95 and GPUs versus rps (sweep)"],
    "calibrate": ["Batch latency versus batch size"],
    "loadtest": ["Measured versus simulated percentiles", "Latency CDF per tier", "P95 over the run"],
}


def expected_numbers(kind: str, data: dict) -> list[str]:
    """Figures a reader must find in every rendering, taken from the saved JSON itself."""
    if kind == "simulate":
        return [f"{data['gpus']} GPUs", ms(data["p95_ms"])] + [ms(t["p95_ms"]) for t in data["per_tier"].values()]
    if kind == "simulate-tokens":
        tiers = data["per_tier"].values()
        return [f"{data['gpus']} GPUs", ms(data["ttft_p95_ms"])] + [ms(t[q]) for t in tiers for q in TOKEN_KEYS]
    if kind == "calibrate-tokens":
        return [f"{data['decode_step_ms']:.4f} ms"] + [ms(p["median_ms"]) for p in data["points"]]
    if kind == "calibrate-requests":
        return [f"{data['decode_step_ms']:.4f} ms"] + [ms(c["median_ms"]) for c in data["stream_cells"]]
    if kind == "capacity":
        return [f"{data['gpus']} GPUs", ms(data["p95_ms"]), data["binding_constraint"]] + [
            f"{p['rps']:,.0f}" for p in data["sweep"]
        ]
    if kind == "calibrate":
        return [f"{data['fixed_ms']:.2f} ms"] + [ms(p["median_ms"]) for p in data["points"]]
    return [f"{data['requests']:,} requests", ms(data["overall"]["measured_ms"]["p95_ms"])] + [
        g["name"] for g in data["gates"]
    ]


@pytest.mark.parametrize("kind", list(FIGURE_TITLES))
def test_report_renders_markdown_and_html_with_the_numbers_and_plots(saved, kind, tmp_path):
    data = json.loads(saved[kind].read_text())
    page, md = tmp_path / f"{kind}.html", tmp_path / f"{kind}.md"
    done = cli("report", str(saved[kind]), "--html", str(page), "--markdown", str(md))
    assert done.returncode == 0, done.stderr
    markdown, html = md.read_text(), page.read_text()
    for number in expected_numbers(kind, data):
        assert number in markdown, (number, markdown)
        assert number in html, number
    assert re.search(r"^\| .+ \|$", markdown, re.MULTILINE) and "|---:" in markdown
    assert not done.stdout.strip() and f"wrote {page}" in done.stderr  # files asked for: no terminal tables
    terminal = cli("report", str(saved[kind]))
    assert terminal.returncode == 0 and expected_numbers(kind, data)[0] in terminal.stdout

    # Self-contained: plotly inlined once, nothing fetched.
    assert "<script src=" not in html and html.count('class="plotly-graph-div"') == len(FIGURE_TITLES[kind])
    assert len(html) > 1_000_000
    for title in FIGURE_TITLES[kind]:
        assert title in html, title
    dom = dump_dom(page)  # after plotly's JavaScript ran in a real browser
    assert dom.count('class="main-svg"') >= len(FIGURE_TITLES[kind]), "plots did not render"


def test_screenshot_of_a_report_page(saved, tmp_path):
    page = tmp_path / "capacity.html"
    assert cli("report", str(saved["capacity"]), "--html", str(page)).returncode == 0
    png = screenshot(page, tmp_path / "capacity.png", 1200, 1400)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000  # a page with plots, not a blank one


def test_a_capacity_result_of_version_7_reads_with_its_constraints_renamed(saved, tmp_path):
    v7 = json.loads(saved["capacity"].read_text())
    limits = v7["constraints"]
    v7 |= {"schema_version": 7, "constraints": {"slo_p95_ms": limits["e2e_p95_ms"], "max_load": limits["max_load"],
                                                "max_reject": limits["max_reject_rate"]}}  # fmt: skip
    old = tmp_path / "v7.json"
    old.write_text(json.dumps(v7))
    done = cli("report", str(old), "--markdown", "-")
    assert done.returncode == 0, done.stderr
    assert f"(SLO {limits['e2e_p95_ms']:g})" in done.stdout and "max_reject_rate 0.001" in done.stdout


def test_older_schema_renders_and_unknown_ones_are_refused_clearly(saved, tmp_path):
    v1 = json.loads(saved["loadtest"].read_text())
    v1["schema_version"] = 1
    for stats in [*v1["per_tier"].values(), v1["overall"]]:  # version 1: three percentiles, no CDFs
        for key in ("measured_ms", "simulated_ms"):
            stats[key] = {q: stats[key][q] for q in ("p50_ms", "p95_ms", "p99_ms")}
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(v1))
    page = tmp_path / "v1.html"
    done = cli("report", str(old), "--html", str(page), "--markdown", "-")
    assert done.returncode == 0, done.stderr
    assert "### infer-plan loadtest" in done.stdout and "Measured versus simulated" in page.read_text()
    assert "Latency CDF per tier" not in page.read_text()  # v1 had no CDFs: shown less, not wrongly

    for version, hint in ((99, "upgrade infer-plan"), (0, "re-run")):
        future = tmp_path / f"v{version}.json"
        future.write_text(json.dumps({**v1, "schema_version": version}))
        done = cli("report", str(future))
        assert done.returncode == 2
        assert f"schema_version {version} is not supported" in done.stderr and hint in done.stderr
        assert "reads schema_version 1, 2, 3, 4" in done.stderr and "Traceback" not in done.stderr
    garbage = tmp_path / "g.json"
    garbage.write_text("{not json")
    done = cli("report", str(garbage))
    assert done.returncode == 2 and "not a JSON result" in done.stderr
