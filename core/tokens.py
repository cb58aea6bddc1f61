"""Counting tokens where no engine counts them: the one tokenizer loader and the named estimators.

Each count has one purpose and one name here:

- :func:`load_tokenizer`: the target's own tokenizer (a Hugging Face name or folder, as
  ``vllm bench serve --tokenizer`` takes), loaded once per process for datasets and prompts;
- :func:`estimated_tokens`: a text's length in tokens when no tokenizer is given (OpenAI's
  rule of thumb, four characters a token), for datasets;
- :func:`word_tokens`: the ``sim`` engine's own tokenizer (a word is a token), which the
  load test's generated prompts are written for.

An engine's answer says what it counted (``usage``); those counts win wherever they exist.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .errors import ConfigError

__all__ = ["CHARS_PER_TOKEN", "estimated_tokens", "load_tokenizer", "word_tokens"]

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def estimated_tokens(text: str) -> int:
    """Tokens a text is taken to hold without a tokenizer (a started token counts)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def word_tokens(prompt: str | list[int]) -> int:
    """The ``sim`` engine's count: token ids as given, or whitespace-separated words."""
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


@functools.cache
def load_tokenizer(name: str) -> Any:
    """The tokenizer ``name`` (a Hugging Face name or a local folder), loaded once; a clear error otherwise."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("counting tokens with a tokenizer needs transformers: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # transformers raises many types for a missing or broken tokenizer
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot load the tokenizer {name!r}: {first}", field="tokenizer") from None
