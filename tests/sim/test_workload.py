"""Workloads: length distributions from their short strings, and datasets (JSONL and ShareGPT) read line by line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from infer_plan.core.errors import InferPlanError, UsageError
from infer_plan.core.model import ServiceModel
from infer_plan.core.tokens import CHARS_PER_TOKEN
from infer_plan.sim.inputs.dataset import load_dataset
from infer_plan.sim.inputs.lengths import LengthDist
from infer_plan.sim.inputs.workload import Workload


@pytest.mark.parametrize(
    ("text", "mean", "sd"),
    [
        ("512", 512.0, 0.0),
        ("uniform:64,1024", 544.0, 960 / 12**0.5),
        ("lognormal:mean=512,sd=256", 512.0, 256.0),
        ("normal:mean=512,sd=64", 512.0, 64.0),
        ("exponential:mean=200", 200.0, 200.0),
    ],
)
def test_each_distribution_has_the_moments_its_string_names(text, mean, sd):
    dist = LengthDist.parse(text)
    lengths = dist.sample(200_000, np.random.default_rng(0))
    assert lengths.dtype == np.int32 and lengths.min() >= 1
    assert dist.mean_tokens == pytest.approx(mean)
    assert lengths.mean() == pytest.approx(mean, rel=0.01)  # rounding to whole tokens moves it < 1%
    assert lengths.std() == pytest.approx(sd, rel=0.02, abs=0.5)
    assert LengthDist.parse(str(dist)) == dist  # the report prints what parses back to the same


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0", ">= 1"),
        ("many", "'many' is neither a token count nor a distribution"),
        ("zipf:a=2", "unknown length distribution 'zipf'"),
        ("lognormal:mean=512", "lognormal needs mean, sd"),
        ("lognormal:mean=512,sigma=3", "takes mean, sd, not 'sigma'"),
        ("uniform:900,100", "low <= high"),
        ("normal:mean=x,sd=4", "'x' is not a number"),
        ("exponential:mean=-3", "finite number >= 0"),
    ],
)
def test_bad_length_strings_say_what_is_wrong(text, needle):
    with pytest.raises(UsageError) as err:
        LengthDist.parse(text)
    assert needle in str(err.value)


def test_a_jsonl_dataset_with_timestamps_is_a_trace_and_without_is_a_length_pool(tmp_path):
    timed = tmp_path / "timed.jsonl"
    rows = [
        {"prompt_tokens": 100, "output_tokens": 10, "timestamp": 5.0, "tier": "enterprise"},
        {"prompt_tokens": 200, "output_tokens": 20, "timestamp": 5.5},
        {"prompt_tokens": 300, "output_tokens": 30, "timestamp": 7.0, "tier": "paid"},
    ]
    timed.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    data = load_dataset(timed)
    assert data.prompt_tokens.tolist() == [100, 200, 300] and data.output_tokens.tolist() == [10, 20, 30]
    assert data.times.tolist() == [0.0, 0.5, 2.0] and data.tiers.tolist() == [0, 2, 1]  # no tier: free
    workload = Workload(dataset=timed, schedule={"rps": 1})
    assert workload.is_replay
    arrivals = workload.arrivals(ServiceModel(), horizon_s=60, seed=0)
    assert arrivals.times.tolist() == [0.0, 0.5, 2.0] and arrivals.prompt_tokens.tolist() == [100, 200, 300]

    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({k: r[k] for k in ("prompt_tokens", "output_tokens")}) for r in rows))
    workload = Workload(dataset=pool, schedule={"rps": 50})
    assert not workload.is_replay
    arrivals = workload.arrivals(ServiceModel(), horizon_s=20, seed=0)
    assert len(arrivals) == pytest.approx(1000, rel=0.1)  # the rate's arrivals, lengths drawn from the rows
    assert set(arrivals.prompt_tokens.tolist()) == {100, 200, 300}
    assert (arrivals.output_tokens * 10 == arrivals.prompt_tokens).all()  # rows are drawn whole
    assert workload.shape(ServiceModel()).prompt_tokens == pytest.approx(200.0)


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"prompt_tokens": 5, "output_tokens": 9}', "{oops"], "data.jsonl:2: not a JSON object"),
        (['{"prompt_tokens": 5, "output_tokens": 0}'], "data.jsonl:1: 'output_tokens' must be a whole number"),
        (['{"prompt_tokens": 5.5, "output_tokens": 3}'], "data.jsonl:1: 'prompt_tokens' must be a whole number"),
        (['{"prompt_tokens": 5}'], "data.jsonl:1: 'output_tokens'"),
        (["[1, 2]"], "ShareGPT"),
        (['{"prompt_tokens": 5, "output_tokens": 9, "timestamp": "noon"}'], "expected a timestamp in seconds"),
        (['{"prompt_tokens": 5, "output_tokens": 9, "tier": "gold"}'], "data.jsonl:1:"),
        (
            ['{"prompt_tokens": 5, "output_tokens": 9, "timestamp": 1}', '{"prompt_tokens": 5, "output_tokens": 9}'],
            "data.jsonl:2: give a timestamp on every line or on none",
        ),
        ([""], "holds no requests"),
    ],
)
def test_bad_dataset_lines_name_the_line(tmp_path, lines, needle):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(InferPlanError) as err:
        load_dataset(path)
    assert needle in str(err.value)


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 400}]},
    {"id": "b", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello there"}, {"from": "human", "value": "more"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "no answer"}]},  # skipped: nothing to generate
]  # fmt: skip


def test_sharegpt_takes_the_first_exchange_and_says_how_it_counted(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    data = load_dataset(path)
    assert data.prompt_tokens.tolist() == [40 // CHARS_PER_TOKEN, 1]  # "hi": 2 characters, at least one token
    assert data.output_tokens.tolist() == [100, 3]
    assert data.times is None and "estimated at 4 characters a token" in data.counted_with
    assert "estimated at 4 characters" in Workload(dataset=path, schedule={"rps": 1}).describe_lengths()


def test_sharegpt_counted_with_a_real_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train([str(corpus)], vocab_size=300, special_tokens=["<s>", "</s>"])
    folder = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )
    path = tmp_path / "sharegpt.json"
    answer = "jumps over the lazy dog " * 3
    turns = [{"from": "human", "value": "the quick brown fox"}, {"from": "gpt", "value": answer}]
    path.write_text(json.dumps([{"conversations": turns}]))
    data = load_dataset(path, tokenizer=str(folder))
    assert data.counted_with == f"counted with the tokenizer {folder}"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert data.prompt_tokens[0] == len(tok.encode("the quick brown fox", add_special_tokens=False))
    assert data.output_tokens[0] == len(tok.encode(answer, add_special_tokens=False))
    with pytest.raises(InferPlanError, match="cannot load the tokenizer"):
        load_dataset(path, tokenizer=str(tmp_path / "missing"))
