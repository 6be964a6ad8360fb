"""Consoles, run state and rendering helpers shared by the command modules.

Human output goes to stdout (stderr under ``--json``, which keeps stdout for one JSON document);
notes and errors go to stderr.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .checkpoint import Checkpoint
from .errors import (
    QKRestoreError,
)
from .plan import RestorePlan

out_console = Console()
err_console = Console(stderr=True)
STATE: dict[str, Any] = {"debug": False, "argv": []}


def command_text() -> str:
    """The command as the user typed it, for the model card and the provenance record."""
    return shlex.join(["qkrestore", *STATE["argv"]])


# -- helpers --------------------------------------------------------------------------------------


def _finite(doc: Any) -> Any:
    """JSON has no NaN or infinity (e.g. the drift of an all-zero tensor): such values become null."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    return doc


def emit_json(doc: Any) -> None:
    """The one JSON document of a --json run, on stdout, always strictly valid JSON."""
    sys.stdout.write(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")


def human_console(json_mode: bool, quiet: bool = False) -> Console | None:
    """Where human-readable output goes: stdout normally, stderr under --json, nowhere under --quiet."""
    if quiet:
        return None
    return err_console if json_mode else out_console


def note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(f"[yellow]note:[/yellow] {msg}", highlight=False, soft_wrap=True)


def open_checkpoint(
    path: Path, label: str, partial: bool = False, weights: str | None = None
) -> Checkpoint:
    try:
        return Checkpoint.open(path, partial=partial, weights=weights)
    except QKRestoreError as exc:
        exc.message = f"{label}: {exc.message}"
        raise


class ByteProgress:
    """A byte progress bar with throughput, shown only once a run has taken more than a second.

    Short runs print nothing extra; ``advance`` is safe to call from the writer's threads.
    """

    DELAY_S = 1.0

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self.task = self.bar.add_task(description, total=total)
        self.started_at = time.monotonic()
        self.shown = False
        self.lock = threading.Lock()

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if self.enabled and not self.shown and time.monotonic() - self.started_at > self.DELAY_S:
            with self.lock:
                if not self.shown:
                    self.shown = True
                    self.bar.start()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self.bar.stop()


def plan_table(plan: RestorePlan, post: Checkpoint) -> Table:
    table = Table(title=f"{plan.method}: {len(plan.patches)} tensors in layers {plan.layers}")
    for col in ("layer", "kind", "tensor", "rows", "dtype", "file", "from"):
        table.add_column(col, overflow="fold", no_wrap=col == "tensor")
    for p in plan.patches:
        rows = ", ".join(f"{a}:{b}" for a, b in p.rows[:4]) + (" …" if len(p.rows) > 4 else "")
        dtype = p.dtype if not p.cast else f"{p.pre_dtype}→{p.dtype}"
        table.add_row(
            str(p.layer),
            plan.layer_kinds[p.layer],
            p.name,
            rows,
            dtype,
            p.file,
            p.source,
        )
    return table
