"""The ``attn-locality`` command: needle weight and local mass per head, on real prompts.

Parse, build the prompts, call :mod:`qkrestore.diagnostics.locality`, render. ``--json`` puts one
JSON document on stdout and everything for humans on stderr; ``--plot FILE.png`` is checked before
any model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .options import DeviceChoice, DeviceOpt, JsonOpt, PlotOpt, RemoteOpt, SeedOpt, Task
from .output import emit_json, err_console, note, out_console

ATTN_LOCALITY_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore attn-locality ./base ./sft ./sft-qkrestore --length 2048 --samples 4\n"
    "  qkrestore attn-locality ./base ./sft --text essay.txt --last-k 128 --plot loc.png\n\n"
    "local mass: weight on the last k tokens (1.0 = sees only them); needle weight: weight from "
    "the question onto the needle sentence (NIAH prompts). 'uniform' is what uniform attention "
    "gives on the same prompts."
)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def attn_locality(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="Model folders, e.g. PRE POST RESTORED (compared in this order).",
        ),
    ],
    length: Annotated[
        int, typer.Option("--length", min=64, help="Prompt length in tokens.")
    ] = 2048,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Prompts (NIAH depths, or text windows).")
    ] = 4,
    text: Annotated[
        Path | None,
        typer.Option("--text", help="A UTF-8 text file: windows of --length tokens of it."),
    ] = None,
    last_k: Annotated[
        int, typer.Option("--last-k", min=1, help="Window of the local mass, in tokens.")
    ] = 64,
    task: Annotated[
        Task, typer.Option("--task", help="NIAH task of the prompts (without --text).")
    ] = Task.single_2,
    chat_template: Annotated[
        bool,
        typer.Option("--chat-template", help="Wrap NIAH prompts in the tokenizer's template."),
    ] = False,
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="Tokenizer folder (default: the first MODEL)."),
    ] = None,
    device: DeviceOpt = DeviceChoice.auto,
    seed: SeedOpt = 0,
    trust_remote_code: RemoteOpt = False,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per softmax layer and head: the attention weight on the last k tokens and on the needle.

    Runs each model (eager attention, float32, one prompt at a time) on the same real prompts:
    NIAH prompts by default, or windows of --text. Unlike attn-distance on random tokens, these
    numbers move when heads become local.
    """
    from .. import api_eval

    result = api_eval.attn_locality(
        models,
        length=length,
        samples=samples,
        text=text,
        last_k=last_k,
        task=task.value,
        chat_template=chat_template,
        tokenizer=tokenizer,
        device=device.value,
        seed=seed,
        trust_remote_code=trust_remote_code,
        plot=plot,
        progress=lambda msg: err_console.print(msg, highlight=False),
    )
    doc = result.to_json()
    source = doc.get("source", "")
    names = [Path(m).name for m in models]
    for n in result.notes:
        note(n)
    if json_out:
        emit_json(doc)
    c = err_console if json_out else out_console
    uniform = doc["uniform"]
    has_needle = uniform["needle_weight"] is not None
    table = Table(
        title=f"attention locality on {source} ({len(doc['prompts'])} × ~{length} tokens): "
        f"local mass L(k={last_k}){' | needle weight R' if has_needle else ''}, mean over heads"
    )
    table.add_column("layer", justify="right")
    table.add_column("kind")
    for name in names:
        table.add_column(f"L {name}", justify="right")
    if has_needle:
        for name in names:
            table.add_column(f"R {name}", justify="right")
    rows = [m["layers"] for m in doc["models"]]
    for k, first in enumerate(rows[0]):
        cells = [_fmt(r[k]["local_mass"]["mean"]) for r in rows]
        if has_needle:
            cells += [_fmt((r[k]["needle_weight"] or {}).get("mean")) for r in rows]
        table.add_row(str(first["layer"]), first["kind"], *cells)
    c.print(table)
    c.print(
        f"uniform attention would give L = {_fmt(uniform['local_mass'])}"
        + (f", R = {_fmt(uniform['needle_weight'])}" if has_needle else ""),
        highlight=False,
    )
    if plot is not None:
        c.print(f"figure: {plot}", highlight=False)
