"""Typed errors that carry a message meant for the user.

The CLI prints ``str(err)`` on one line and exits 2; nothing below the CLI prints or
exits by itself.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InferPlanError", "UsageError"]


class InferPlanError(Exception):
    """Base class: the message is complete and user-facing."""

    exit_code = 2


class UsageError(InferPlanError):
    """A flag or argument the user gave cannot be used."""


class ConfigError(InferPlanError):
    """A scenario, profile, keys or trace file is missing, malformed or inconsistent."""
