"""``infer-plan tiny-model DIR``: build the small random-weight Llama used by tests and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..server.tiny_model import build_tiny_model
from .options import QuietOpt
from .progress import status_progress


def tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to build the model in (reused when already built).")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the directory holds the model.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a tiny Llama (random weights, tokenizer trained on local text) for --backend vllm demos and tests."""
    with status_progress(f"building the tiny model in {out}", enabled=not quiet):
        path = build_tiny_model(out, force=force)
    print(f"tiny model ready in {path} (serve it: infer-plan serve --backend vllm --model {path})")
