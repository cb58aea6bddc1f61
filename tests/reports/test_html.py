import json
import subprocess
import sys


def test_loadtest_html_is_self_contained_with_plots_and_gates(tmp_path):
    page = tmp_path / "r.html"
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "infer_plan.cli",
            "loadtest",
            "--target",
            "sim",
            "--rps",
            "100",
            "--duration",
            "4",
            "--html",
            str(page),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    data = json.loads(out.read_text())
    assert "<script" in text and "<script src=" not in text  # plotly.js inlined, no network
    assert len(text) > 1_000_000
    assert "measured P95" in text and "simulated P95" in text
    for gate in data["gates"]:
        assert gate["name"] in text
    assert f"{data['requests']:,} requests measured" in text
