"""Shared system prompts (``--shared-prefix TOKENS:COUNT[:zipf=S]``): the workload prefix caching exists for.

Each request's prompt starts with one of COUNT system prompts of TOKENS tokens, followed
by its own ``--prompt-tokens``; which one is drawn uniformly, or by a Zipf law of
exponent S over their ranks (a few popular agents or apps, a long tail), as the load
generators of the field offer it (vLLM bench's prefix repetition, GuideLLM's and
inference-perf's shared prefixes).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...core.errors import UsageError
from ...core.prompt_blocks import SharedPrefix

__all__ = ["SharedPrefixSpec"]


class SharedPrefixSpec(BaseModel):
    """COUNT system prompts of TOKENS tokens, the one each request starts with drawn uniformly or by Zipf(S)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int = Field(ge=1, le=10_000_000)
    count: int = Field(ge=1, le=10_000_000)
    zipf: float = Field(default=0.0, ge=0, le=100, description="0: every prompt as likely")

    @classmethod
    def parse(cls, text: str) -> SharedPrefixSpec:
        """``TOKENS:COUNT`` or ``TOKENS:COUNT:zipf=S``; a bad string is one line naming the form."""
        form = "--shared-prefix takes TOKENS:COUNT[:zipf=S], e.g. 1000:8 or 1000:64:zipf=1.1"
        parts = text.strip().split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            zipf = 0.0
            if len(parts) == 3:
                key, _, value = parts[2].partition("=")
                if key.strip() != "zipf":
                    raise ValueError
                zipf = float(value)
            return cls(tokens=int(parts[0]), count=int(parts[1]), zipf=zipf)
        except ValueError as err:  # pydantic's ValidationError is a ValueError too
            raise UsageError(f"{form} (got {text!r})", field="shared_prefix") from err

    def __str__(self) -> str:
        return f"{self.tokens}:{self.count}" + (f":zipf={self.zipf:g}" if self.zipf else "")

    def shares(self) -> np.ndarray:
        """The chance of each system prompt, most popular first."""
        weights = np.arange(1, self.count + 1, dtype=np.float64) ** -self.zipf
        return weights / weights.sum()

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Which system prompt each of ``n`` requests starts with (object array of :class:`SharedPrefix`)."""
        groups = rng.choice(self.count, size=n, p=self.shares()).tolist()
        one_each = {g: SharedPrefix(g, self.tokens) for g in set(groups)}
        prefixes = np.empty(n, dtype=object)
        prefixes[:] = [one_each[g] for g in groups]
        return prefixes
