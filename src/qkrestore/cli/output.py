"""Consoles, JSON, progress bars and tables: everything the command modules share for output.

Human output goes to stdout (stderr under ``--json``, which keeps stdout for one JSON document);
notes and errors go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich import box
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

from ..surgery.card import command_line
from ..surgery.plan import RestorePlan

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 verification failed; 2 usage or input error; 3 internal error; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)

out_console = Console()
err_console = Console(stderr=True)
STATE: dict[str, Any] = {"debug": False, "argv": []}


def command_text() -> str:
    """The command as the user typed it, for the model card and the provenance record."""
    return command_line(STATE["argv"])


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


@contextlib.contextmanager
def byte_progress(description: str, total: int, enabled: bool) -> Iterator[Any]:
    """A job's progress hook: a :class:`ByteProgress` that is stopped however the job ends."""
    with ByteProgress(description, total, enabled) as bar:
        yield bar.advance


def rows_text(rows: Sequence[Sequence[int]]) -> str:
    """Row ranges in a few characters: ``0:64``, ``0:16, 32:48``, or ``64 rows in 8 ranges``."""
    if len(rows) <= 2:
        return ", ".join(f"{a}:{b}" for a, b in rows)
    return f"{sum(b - a for a, b in rows)} rows in {len(rows)} ranges"


_SHARD = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")


def short_file(name: str) -> str:
    """A weight file's name in a few characters: ``model-00002-of-00004.safetensors`` → ``2/4``."""
    m = _SHARD.match(name)
    return f"{int(m.group(1))}/{int(m.group(2))}" if m else name.removesuffix(".safetensors")


def narrow_table(title: str, columns: Sequence[str]) -> Table:
    """A table without outer borders, so that it reads in an 80-column terminal."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def fit_columns(table: Table) -> Table:
    """A wide table of metrics (the sweep's) made to read in an 80-column terminal without cutting
    a header or a number: no outer borders; a header like ``recall@16384`` on two lines (``recall``
    over ``@16384``); every right-aligned (numeric) column at least as wide as its header's longest
    line and its widest value, and every column folding, never ending in an ellipsis. What must
    give way are the text columns (names, layer lists), which fold onto more lines."""
    table.box = box.SIMPLE_HEAD
    table.show_edge = False
    table.pad_edge = False
    table.padding = (0, 1, 0, 0)  # with the box's blank separator: two spaces between columns
    for col in table.columns:
        header = col.header if isinstance(col.header, str) else ""
        if "@" in header:
            head, _, tail = header.partition("@")
            header = f"{head}\n@{tail}"
            col.header = header
        need = max((len(line) for line in header.splitlines()), default=0)
        if col.justify == "right" or not header:  # numbers, and the short marks column
            need = max(
                [
                    need,
                    *(len(line) for c in col.cells if isinstance(c, str) for line in c.split("\n")),
                ]
            )
        else:
            col.no_wrap = False  # names and layer lists fold onto more lines
        col.min_width = max(col.min_width or 0, need)
        col.overflow = "fold"
    return table


def short_tensor(name: str, layer: int) -> str:
    """A tensor's name below its layer (``self_attn.q_proj.weight``); the full name elsewhere."""
    _, sep, tail = name.partition(f".{layer}.")
    return tail if sep else name


def adapter_table(modules: Sequence[dict[str, Any]]) -> Table:
    """What QK-Restore does to each LoRA module of a PEFT adapter (keep, drop, zero rows, solve)."""
    table = narrow_table("adapter modules", ("layer", "module", "action", "target", "rows"))
    for m in modules:
        layer = m.get("layer")
        table.add_row(
            "" if layer is None else str(layer),
            m["module"],
            m.get("action", ""),
            m.get("target", ""),
            rows_text(m.get("rows") or []),
        )
    return table


def plan_table(plan: RestorePlan) -> Table:
    """The plan, one row per tensor, narrow enough for an 80-column terminal."""
    table = narrow_table(
        f"{plan.method}: {len(plan.patches)} tensors in layers {plan.layers}",
        ("layer", "kind", "tensor", "rows", "dtype", "shard", "from"),
    )
    for p in plan.patches:
        dtype = p.dtype if not p.cast else f"{p.pre_dtype}→{p.dtype}"
        table.add_row(
            str(p.layer),
            plan.layer_kinds[p.layer],
            short_tensor(p.name, p.layer),
            rows_text(p.rows),
            dtype,
            short_file(p.file),
            p.source,
        )
    return table
