"""Errors a user can act on. Each renders as one line: what is wrong and where (file, key, stage)."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EdgepipeError",
    "ModelInputError",
    "StageError",
    "TargetError",
    "ValidationFailed",
]


class EdgepipeError(Exception):
    """Base class: the CLI prints ``str(err)`` as one line and exits with :attr:`exit_code`."""

    exit_code = 2


class ConfigError(EdgepipeError):
    """A config or profile file is malformed, has an unknown key or a wrong type."""


class TargetError(ConfigError):
    """An unknown target name or an invalid target profile."""


class ModelInputError(EdgepipeError):
    """The model directory is missing, corrupt or of an unsupported family."""


class StageError(EdgepipeError):
    """A stage could not run on its input (e.g. an operator the target cannot execute)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage '{stage}': {message}")
        self.stage = stage


class ValidationFailed(EdgepipeError):
    """A validation gate failed; the report was written before this was raised."""

    exit_code = 1

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table
