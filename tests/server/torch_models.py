"""Torch model factories for the torch backend's tests (``--torch-model tests.server.torch_models:NAME``)."""

from __future__ import annotations

import torch
from infer_plan.server.backends.torch_encoder import default_model

OOM_ABOVE = 4  # batches larger than this run out of memory


class _RunsOutOfMemory(torch.nn.Module):
    """The built-in encoder, except that a batch of more than OOM_ABOVE inputs cannot be allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = default_model()

    def forward(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] > OOM_ABOVE:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {ids.shape[0]} GiB")
        return self.inner(ids, padding_mask)


def runs_out_of_memory() -> tuple[torch.nn.Module, object]:
    _, preprocess = default_model()
    return _RunsOutOfMemory(), preprocess
