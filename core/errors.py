"""Typed errors that carry a message meant for the user.

The CLI prints ``str(err)`` on one line and exits 2; nothing below the CLI prints or
exits by itself. An error about one setting names it by its ``field`` (the name it
has in the service model, a spec or a config), never by a command-line flag: the CLI
knows which flag sets which field and says so in front of the message.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InferPlanError", "SimulationError", "UsageError"]


class InferPlanError(Exception):
    """Base class: the message is complete and user-facing."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the setting at fault, if one is


class UsageError(InferPlanError):
    """A setting the user gave cannot be used."""


class ConfigError(InferPlanError):
    """A scenario, profile, keys or trace file is missing, malformed or inconsistent."""


class SimulationError(InferPlanError):
    """A simulation could not finish (a worker process died): nothing the inputs said was wrong, but they were
    likely too large for this machine."""
