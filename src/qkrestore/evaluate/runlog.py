"""Nothing measured is lost: progress events with an ETA, the results file, and resuming from it.

Why: a sweep measures one candidate after another for minutes to hours. Each finished candidate is
written at once to a JSON document (rewritten atomically, so an interruption leaves the previous
complete version), a rerun with ``resume`` skips what that file already holds, and the caller is
told per candidate how long it took and how long the rest will take. Library code never prints:
all of it reaches the caller through a :class:`Progress` object (the CLI draws a bar on a
terminal and plain lines elsewhere).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QKRestoreError


@dataclass(frozen=True)
class Step:
    """One finished (or resumed) candidate, as the progress display shows it."""

    index: int  # 1-based position in the run
    total: int
    name: str
    seconds: float | None  # None for a candidate taken from the resume file
    eta_s: float | None  # estimated seconds for the candidates still to measure
    result: dict[str, Any]
    resumed: bool = False


class Progress:
    """What a long measurement reports while it runs; every method does nothing by default."""

    def start(self, index: int, total: int, name: str, units: int) -> None:
        """A candidate begins; ``units`` is the number of :meth:`advance` calls to expect."""

    def advance(self, n: int = 1) -> None:
        """One unit of evaluation (a prompt, an item, a task run) is done."""

    def finish(self, step: Step) -> None:
        """A candidate is measured (or was taken from the resume file)."""

    def document(self, doc: dict[str, Any]) -> None:
        """The document so far (``complete`` false until the end), after every candidate."""


class Clock:
    """Per-candidate durations of this run, and the ETA they imply for the rest."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def add(self, seconds: float) -> None:
        self.durations.append(seconds)

    def eta(self, remaining: int) -> float | None:
        if not self.durations:
            return None
        return remaining * sum(self.durations) / len(self.durations)


def write_json_atomic(path: Path, doc: Mapping[str, Any], option: str = "--json-out") -> None:
    """Write ``doc`` to ``path`` via a temporary sibling, fsynced and renamed onto it: a reader (or
    an interruption) only ever sees a complete document."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise QKRestoreError(f"{option} {path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, allow_nan=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Saving(Progress):
    """Passes events on, and rewrites the results file (if any) after every candidate."""

    def __init__(self, inner: Progress, path: Path | None) -> None:
        self.inner, self.path = inner, path

    def start(self, index: int, total: int, name: str, units: int) -> None:
        self.inner.start(index, total, name, units)

    def advance(self, n: int = 1) -> None:
        self.inner.advance(n)

    def finish(self, step: Step) -> None:
        self.inner.finish(step)

    def document(self, doc: dict[str, Any]) -> None:
        if self.path is not None:
            write_json_atomic(self.path, doc)
        self.inner.document(doc)


def check_writable(path: Path, option: str = "--json-out") -> None:
    """Fail before any work when the results file's folder does not exist."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise QKRestoreError(f"{option} {path}: the folder {parent} does not exist")


def load_resume(
    path: Path, settings: Mapping[str, Any], option: str = "--resume"
) -> dict[str, Any]:
    """The document a previous run wrote to ``path``, if it ran with the same ``settings``.

    A missing file is an empty start (``{}``) (so the same command line can be rerun until it completes);
    a file from other settings is refused in one line naming the first settings that differ.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QKRestoreError(f"{option} {path}: not a results file ({exc})") from None
    if not isinstance(doc, dict):
        raise QKRestoreError(f"{option} {path}: not a results file of this command")
    theirs = doc.get("settings")
    if not isinstance(theirs, dict):
        raise QKRestoreError(f"{option} {path}: the file records no settings")
    differ = diff(theirs, settings)
    if differ:
        raise QKRestoreError(
            f"{option} {path}: written with other settings ({'; '.join(differ[:3])}); rerun "
            "with the same options, or write to a new file"
        )
    return doc


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs (JSON-normalised)."""
    a, b = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} → {b.get(key)!r}")
    return out
