"""The public LLM traces read as published: Mooncake / Bailian JSONL, Azure, BurstGPT and Vidur CSV.

The sample files in ``examples/traces/`` are written in each trace's published layout
(``shared/notes/traces.md``); the expected figures here are read back from the files
with the standard library, independently of the readers under test.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from infer_plan.core.errors import ConfigError
from infer_plan.sim.inputs.dataset import TraceFormat, load_dataset
from infer_plan.sim.inputs.workload import Workload

from tests.helpers import REPO, run_cli

TRACES = REPO / "examples" / "traces"


def csv_columns(path: Path, *names: str) -> list[list[str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [[row[name] for row in rows] for name in names]


@pytest.mark.parametrize(("name", "fmt", "block"), [("mooncake", "mooncake", 512), ("bailian", "bailian", 16)])
def test_a_hash_id_trace_is_read_in_ms_with_its_blocks_and_detected_by_its_block_size(name, fmt, block):
    path = TRACES / f"{name}-sample.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    data = load_dataset(path)  # detected: the first row's ids say which block size
    assert data.block_tokens == block and data.counted_with.startswith(f"{fmt} trace's")
    order = np.argsort([r["timestamp"] for r in rows], kind="stable")
    stamps = np.array([rows[k]["timestamp"] for k in order]) / 1000.0
    assert data.times == pytest.approx(stamps - stamps[0])
    assert data.prompt_tokens.tolist() == [rows[k]["input_length"] for k in order]
    assert data.output_tokens.tolist() == [rows[k]["output_length"] for k in order]
    assert [ids.tolist() for ids in data.block_ids] == [rows[k]["hash_ids"] for k in order]
    assert set(data.tiers.tolist()) == {2}  # a trace names no tier: free, as a trace row without one is


def test_the_repeated_prefix_share_counts_leading_blocks_seen_before():
    path = TRACES / "mooncake-sample.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    seen, reused, total = set(), 0, 0
    for row in rows:  # the file is in time order
        leading = 0
        while leading < len(row["hash_ids"]) and row["hash_ids"][leading] in seen:
            leading += 1
        reused += min(leading * 512, row["input_length"])
        total += row["input_length"]
        seen |= set(row["hash_ids"])
    assert 0 < reused < total
    assert f"{reused / total:.0%} of prompt tokens repeat an earlier prefix" in load_dataset(path).counted_with


def test_an_azure_trace_reads_its_date_times_as_seconds():
    path = TRACES / "azure-code-sample.csv"
    stamps, prompts, outputs = csv_columns(path, "TIMESTAMP", "ContextTokens", "GeneratedTokens")
    seconds = np.array([datetime.strptime(s[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp() for s in stamps])
    data = load_dataset(path)
    assert data.times == pytest.approx(seconds - seconds[0], abs=1e-5)
    assert data.prompt_tokens.tolist() == [int(p) for p in prompts]
    assert data.output_tokens.tolist() == [int(o) for o in outputs]
    assert data.block_ids is None


def test_burstgpt_failed_requests_are_dropped_and_counted():
    path = TRACES / "burstgpt-sample.csv"
    stamps, requests, responses = csv_columns(path, "Timestamp", "Request tokens", "Response tokens")
    kept = [k for k, r in enumerate(responses) if int(r) > 0]
    assert len(kept) < len(responses)  # the sample holds failed requests (0 response tokens)
    data = load_dataset(path)
    assert data.prompt_tokens.tolist() == [int(requests[k]) for k in kept]
    assert data.output_tokens.tolist() == [int(responses[k]) for k in kept]
    assert data.times[-1] == pytest.approx(float(stamps[kept[-1]]) - float(stamps[kept[0]]))
    assert f"{len(responses) - len(kept)} rows with 0 prompt or output tokens dropped" in data.counted_with


def test_a_vidur_trace_and_an_explicit_format():
    path = TRACES / "vidur-sample.csv"
    stamps, prefill, decode = csv_columns(path, "arrived_at", "num_prefill_tokens", "num_decode_tokens")
    data = load_dataset(path, fmt=TraceFormat.VIDUR)
    assert data.times[-1] == pytest.approx(float(stamps[-1]) - float(stamps[0]))
    assert data.prompt_tokens.tolist() == [int(p) for p in prefill]
    assert data.output_tokens.tolist() == [int(d) for d in decode]
    with pytest.raises(ConfigError, match="a azure trace's header names TIMESTAMP"):
        load_dataset(path, fmt=TraceFormat.AZURE)


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("m.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}\n'
         '{"timestamp": 5, "input_length": -3, "output_length": 4, "hash_ids": [1]}', "m.jsonl:2: 'input_length'"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}\n'
         '{"timestamp": 5, "input_length": 600, "output_length": 4, "hash_ids": [1, 2, 3]}', "m.jsonl:2: 3 hash_ids"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": "ab"}',
         "m.jsonl:1: 'hash_ids' must be a list"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,5\nyesterday,10,5",
         "a.csv:3: 'TIMESTAMP' must be a date-time"),
        ("b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,GPT-4,10,2.5,12,API log",
         "b.csv:2: 'Response tokens' must be a whole number"),
        ("b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,GPT-4,10,0,10,API log",
         "b.csv: the trace holds no request with prompt and output tokens"),
        ("x.csv", "when,prompt,answer\n1,2,3", "x.csv: not a dataset format infer-plan knows"),
    ],
)  # fmt: skip
def test_a_bad_row_is_one_error_naming_its_line(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_dataset(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_public_trace_replays_through_simulate_and_a_bad_one_exits_2(tmp_path):
    out = tmp_path / "sim.json"
    done = run_cli(
        "simulate", "--profile", str(REPO / "examples" / "profiles" / "llama-3.1-8b-instruct-h100.toml"),
        "--gpus", "1", "--dataset", str(TRACES / "mooncake-sample.jsonl"), "--warmup", "0", "--json", "--save",
        str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = TRACES.joinpath("mooncake-sample.jsonl").read_text().splitlines()
    assert result["requests"] == len(rows)  # every row replayed once, at its own time
    assert "mooncake trace's token counts" in result["lengths"]
    workload = Workload(dataset=TRACES / "bailian-sample.jsonl", dataset_format="mooncake", schedule={"rps": 1})
    with pytest.raises(ConfigError, match="bailian"):
        workload.describe_lengths()  # 16-token blocks read as 512: the error says which format it is
    bad = tmp_path / "bad.csv"
    bad.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,GPT-4,x,3,3,API log\n")
    done = run_cli("simulate", "--rps", "5", "--gpus", "1", "--duration", "5", "--dataset", str(bad),
                   "--dataset-format", "burstgpt")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("bad.csv:2: expected 'Request tokens' as a number, got 'x'")
