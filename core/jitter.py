"""The measured spread of a GPU's unit of work, drawn the same way by every engine that runs steps.

A calibrated profile's ``cycle_jitter`` holds multipliers at evenly spaced quantiles of
measured over fitted time: of a batch cycle for static batching, of a step for
continuous batching (``calibrate/streamed.py`` reads them from the decode gaps). A
continuous engine draws one multiplier per step from a stream of its own per GPU, seeded
by the run's seed and the GPU's index, so the fast engine and its step-by-step reference
(which runs each GPU's steps in the same order) give every step the same length.
"""

from __future__ import annotations

import numpy as np

from .model import ServiceModel

__all__ = ["StepJitter"]

_BLOCK = 1024  # multipliers drawn at once: a numpy call per step would cost more than the step's own arithmetic
_STREAM_TAG = 0x57E9  # keeps these streams apart from the run's arrival and fault draws of the same seed


class StepJitter:
    """One GPU's step multipliers, in order; :meth:`peek` looks ahead without using them up."""

    def __init__(self, model: ServiceModel, seed: int, gpu: int) -> None:
        self._rng = np.random.default_rng([seed, _STREAM_TAG, gpu])
        self._grid = np.linspace(0.0, 1.0, len(model.cycle_jitter))
        self._quantiles = np.asarray(model.cycle_jitter, dtype=float)
        self._buffer = np.empty(0)
        self._next = 0

    def peek(self, k: int) -> np.ndarray:
        """The next ``k`` multipliers (a view: copy it to keep it past the next call)."""
        if self._next + k > self._buffer.size:
            drawn = np.interp(self._rng.random(max(k, _BLOCK)), self._grid, self._quantiles)
            self._buffer = np.concatenate([self._buffer[self._next :], drawn])
            self._next = 0
        return self._buffer[self._next : self._next + k]

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` multipliers, used up."""
        out = self.peek(k)
        self._next += k
        return out
