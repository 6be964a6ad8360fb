"""The tool's own error types.

Every problem a user can cause or meet (a broken checkpoint, a wrong option, a failed check) is raised
as a :class:`QKRestoreError`; the CLI turns it into one line on stderr and its ``exit_code``. Anything
else is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class QKRestoreError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class CheckpointError(QKRestoreError):
    """A checkpoint folder, index or safetensors header is missing, malformed or hostile."""


class ConfigError(QKRestoreError):
    """``config.json`` is missing or does not describe a model an adapter understands."""


class PlanError(QKRestoreError):
    """The requested surgery cannot be planned (wrong layer, missing tensor, shape mismatch, ...)."""


class OutputError(QKRestoreError):
    """The output folder cannot be written as asked (exists, inside an input, disk full, ...)."""


class VerifyError(QKRestoreError):
    """An output does not match its plan."""

    exit_code = EXIT_VERIFY_FAILED
