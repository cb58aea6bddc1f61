"""The torch backend's built-in model: a small transformer encoder over UTF-8 bytes, random weights.

It exists so ``serve --backend torch`` runs anywhere with nothing downloaded, and so the
batch cycle it is timed on is a real one: padding, attention over the batch, pooling.
Size: byte embeddings (256 + padding) of width 128, 2 encoder layers (4 heads,
feed-forward 256), mean pooling over the real bytes, a 64-wide output; 0.34 M
parameters. Weights come from a fixed seed, so every replica (and a test) computes the
same function. Replace it with ``--torch-model MODULE:FACTORY``: FACTORY() returns
``(module, preprocess)``, where ``preprocess(text) -> 1-D LongTensor`` and
``module(ids, padding_mask) -> (batch, width)`` tensor.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MAX_BYTES", "ByteEncoder", "default_model", "encode_bytes"]

MAX_BYTES = 256  # longer inputs are cut: attention cost grows with the square of the length
PAD = 256


class ByteEncoder(nn.Module):
    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, ff: int = 256, out: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(PAD + 1, width, padding_idx=PAD)
        self.position = nn.Embedding(MAX_BYTES, width)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, out)

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``ids`` (batch, length) byte ids; ``padding_mask`` True where padded. Returns (batch, out)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.encoder(self.embed(ids) + self.position(positions), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def encode_bytes(text: str) -> torch.Tensor:
    """The input's UTF-8 bytes as ids (at least one, so an empty text still has a position to pool)."""
    data = text.encode("utf-8", "surrogatepass")[:MAX_BYTES] or b" "
    return torch.tensor(list(data), dtype=torch.long)


def default_model() -> tuple[nn.Module, object]:
    """The built-in factory: the same random encoder on every call (fixed seed)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = ByteEncoder()
    finally:
        torch.random.set_rng_state(generator_state)
    return model, encode_bytes
