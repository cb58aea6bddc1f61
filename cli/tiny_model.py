"""``infer-plan tiny-model DIR``: build the small random-weight Llama used by tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..server.tiny_model import build_tiny_model


def tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to build the model in (reused when already built).")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the directory holds the model.")] = False,
) -> None:
    """Build a tiny Llama (random weights, tokenizer trained on local text) for --backend vllm demos and tests."""
    path = build_tiny_model(out, force=force)
    print(f"tiny model ready in {path} (serve it: infer-plan serve --backend vllm --model {path})")
