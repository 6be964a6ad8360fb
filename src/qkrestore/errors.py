"""The tool's own error types.

Every problem a user can cause or meet (a broken checkpoint, a wrong option, a failed check) is raised
as a :class:`QKRestoreError`; the CLI turns it into one line on stderr and its ``exit_code``. Anything
else is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


class OptionError(PlanError):
    """An option's value is wrong (``layers: layer 9 does not exist``); ``option`` is its name.

    Library messages name options as the Python API and recipes spell them (``layers``,
    ``tensor_pattern``); other options a message mentions are written in backticks (`` `layers` ``).
    The CLI renders both as its flags (``--layers``) with :meth:`QKRestoreError.render`.
    """

    def __init__(self, option: str, detail: str, *, hint: str | None = None) -> None:
        super().__init__(f"{option}: {detail}", hint=hint)
        self.option = option


class RecipeError(QKRestoreError):
    """A recipe file cannot be used: unreadable, unsafe YAML, an unknown key or a bad value."""


_MENTION = re.compile(r"`([a-z][a-z0-9_]*)`")


def spell_options(text: str, flag: Callable[[str], str | None]) -> str:
    """``text`` with every backticked option name replaced by ``flag(name)`` where it has one."""
    return _MENTION.sub(lambda m: flag(m.group(1)) or m.group(0), text)


def render(exc: QKRestoreError, flag: Callable[[str], str | None]) -> str:
    """The one line for ``exc`` with option names spelled by ``flag`` (the CLI's flag spellings):
    the option an :class:`OptionError` is about, and every option mentioned in backticks."""
    message = exc.message
    option = exc.option if isinstance(exc, OptionError) else None
    spelled = flag(option) if option is not None else None
    if option is not None and spelled and message.startswith(f"{option}:"):
        message = spelled + message[len(option) :]
    message = spell_options(message, flag)
    hint = None if exc.hint is None else spell_options(exc.hint, flag)
    return message if not hint else f"{message} ({hint})"
