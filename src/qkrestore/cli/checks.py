"""``inspect-layers``, ``verify`` and ``push``: look at a model or an output, check it, upload it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from .. import api_eval
from ..errors import EXIT_VERIFY_FAILED
from ..surgery.inspect import LayerReport
from ..surgery.verification import read_provenance, verify_output
from .options import ForwardMode, ForwardOpt, JsonOpt, PreWeightsOpt, PrivateOpt, RevisionOpt
from .output import (
    EXIT_CODES_HELP,
    adapter_table,
    emit_json,
    err_console,
    narrow_table,
    note,
    out_console,
    rows_text,
    short_file,
    short_tensor,
)

INSPECT_EPILOG = """[bold]Examples[/bold]

  qkrestore inspect-layers ./sft
  qkrestore inspect-layers ./base --compare ./sft
  qkrestore inspect-layers ./sft --json
"""

VERIFY_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore verify ./sft-qkrestore
  qkrestore verify ./sft-qkrestore --pre ./moved/base --post ./moved/sft --json

"""
    + EXIT_CODES_HELP
)

PUSH_EPILOG = """[bold]Examples[/bold]

  qkrestore push ./sft-qkrestore my-org/sft-qkrestore
  qkrestore push ./sft-qkrestore my-org/sft-qkrestore --private --revision experiment
"""


def routing_table(report: LayerReport) -> Table:
    """The routing tensors of every softmax layer, narrow enough for an 80-column terminal."""
    table = narrow_table(
        f"routing tensors (names under {report.layer_prefix}<layer>.)",
        ("layer", "kind", "tensor", "rows", "shape", "dtype", "shard"),
    )
    for layer in report.layers:
        for t in layer["tensors"]:
            table.add_row(
                str(layer["layer"]),
                layer["kind"],
                short_tensor(t["name"], layer["layer"]),
                rows_text(t["rows"]),
                "×".join(map(str, t["shape"])),
                t["dtype"],
                short_file(t["file"]),
            )
    return table


def drift_table(report: LayerReport) -> Table:
    """Relative Q/K drift per softmax layer against the compared model."""
    drift = narrow_table("Q/K drift ‖ΔW‖/‖W‖", ("layer", "kind", "q", "k"))
    for row in (report.compare or {}).get("layers", []):
        drift.add_row(
            str(row["layer"]),
            row["kind"],
            *(f"{row[t]:.4g}" if t in row else "-" for t in ("q", "k")),
        )
    return drift


def _softmax_reasons(report: LayerReport) -> dict[str, list[int]]:
    """Softmax layers grouped by why they are global or local (e.g. a window that never slides)."""
    grouped: dict[str, list[int]] = {}
    for i in sorted({*report.global_layers, *report.local_layers}):
        if i < len(report.layer_reasons):
            grouped.setdefault(report.layer_reasons[i], []).append(i)
    return grouped


def _few(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (
        f", … ({len(names) - shown} more)" if len(names) > shown else ""
    )


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2,5``."""
    out: list[str] = []
    for i in layers:
        if out and i == int(out[-1].rsplit("-", 1)[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def inspect_layers(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder, or a PEFT adapter folder.")],
    compare_with: Annotated[
        Path | None,
        typer.Option("--compare", help="Another checkpoint: report Q/K drift ‖ΔW‖/‖W‖ per layer."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", help="Where MODEL holds two weight sets: the one to read (see merge)."
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="For an adapter: its base model, to plan each LoRA module."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show which layers are softmax attention and where their Q/K tensors are."""
    report = api_eval.inspect_layers(model, compare_with=compare_with, weights=weights, base=base)
    if isinstance(report, api_eval.AdapterLayerReport):
        _show_adapter(report.to_json(), json_out)
        return
    if json_out:
        emit_json(report.to_json())
        return
    c = out_console
    c.print(
        f"[bold]{report.path}[/bold]\n"
        f"model_type: {report.model_type}   adapter: {report.adapter} ({report.adapter_reason})\n"
        f"layers: {report.num_layers}   global softmax: {report.global_layers}   "
        f"local softmax: {report.local_layers}",
        highlight=False,
    )
    if report.adapter_description:
        c.print(f"family: {escape(report.adapter_description)}", highlight=False)
    files = report.weight_files
    c.print(
        f"weights: {escape(str(files.get('entry')))} ({escape(str(files.get('reason', '')))})",
        highlight=False,
    )
    for reason, layers in _softmax_reasons(report).items():
        c.print(f"why layers {_ranges(layers)}: {escape(reason)}", highlight=False)
    for n in report.adapter_notes:
        note(n)
    c.print(routing_table(report))
    if report.compare is not None:
        c.print(f"compared with: {report.compare['other']}", highlight=False)
        c.print(drift_table(report))
        for key, who in (("only_in_model", "MODEL"), ("only_in_other", "OTHER")):
            names = report.compare[key]
            if names:
                note(f"only {who} has {len(names)} tensors: {_few(names)}")


def verify(
    out: Annotated[Path, typer.Argument(help="An output folder written by merge or pro.")],
    pre: Annotated[Path | None, typer.Option("--pre", help="Override PRE's recorded path.")] = None,
    post: Annotated[
        Path | None, typer.Option("--post", help="Override POST's recorded path.")
    ] = None,
    forward: ForwardOpt = ForwardMode.auto,
    pre_weights: PreWeightsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check every byte of OUT against its recorded plan, PRE and POST."""
    from ..adapter import is_adapter_record, verify_adapter_output

    record = read_provenance(out)
    if is_adapter_record(record):  # made from a PEFT adapter: merged with PRE, as loaders do
        doc = verify_adapter_output(out, record, pre, post)
        if json_out:
            emit_json(doc)
        else:
            out_console.print(
                f"[green]✓[/green] {out}: {doc['tensors_checked']} tensors of the "
                f"{doc['output_kind']} output match PRE and the input adapter",
                highlight=False,
            )
        return
    report = verify_output(out, pre, post, forward.value, pre_weights=pre_weights)
    if json_out:
        emit_json(report.to_json())
    else:
        c = out_console
        if report.ok:
            c.print(
                f"[green]✓[/green] {out}: {report.tensors_checked} tensors, {report.files_checked} "
                f"other files, {report.bytes_checked:,} bytes match the plan",
                highlight=False,
            )
        for m in report.mismatches:
            err_console.print(f"[red]✗[/red] {m}", highlight=False)
        if report.forward:
            mark = "[green]✓[/green]" if report.forward["ok"] else "[red]✗[/red]"
            (c if report.forward["ok"] else err_console).print(
                f"{mark} forward pass: {report.forward['message']}", highlight=False
            )
    if not report.ok:
        if not json_out:
            first = report.mismatches[0] if report.mismatches else None
            err_console.print(
                f"error: verification failed{': ' + str(first) if first else ''}",
                highlight=False,
            )
        raise typer.Exit(EXIT_VERIFY_FAILED)


def _show_adapter(doc: dict[str, Any], json_out: bool) -> None:
    """``inspect-layers ADAPTER [--base PRE]``: the adapter's modules and what QK-Restore does."""
    if json_out:
        emit_json(doc)
        return
    c = out_console
    c.print(
        f"[bold]{doc['path']}[/bold]\nPEFT LoRA adapter   base_model: {doc['base_model']}   "
        f"DoRA: {doc['use_dora']}   rsLoRA: {doc['use_rslora']}   "
        f"{len(doc['modules'])} modules, {doc['adapter_bytes']:,} bytes",
        highlight=False,
    )
    if doc.get("base") is None:
        note("layer kinds come from the base model's config: pass --base PRE to see the plan")
    else:
        c.print(
            f"base: {doc['base']}   model_type: {doc['model_type']}   "
            f"global softmax: {doc['global_layers']}",
            highlight=False,
        )
    c.print(adapter_table(doc["modules"]))


def push(
    out: Annotated[Path, typer.Argument(help="An output folder written by merge or pro.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id to create or update, e.g. org/name.")],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    pre: Annotated[Path | None, typer.Option("--pre", help="Override PRE's recorded path.")] = None,
    post: Annotated[
        Path | None, typer.Option("--post", help="Override POST's recorded path.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Verify an output made earlier, then upload it to the Hugging Face Hub (uses your saved Hub
    token)."""
    result = api_eval.push(out, repo_id, private=private, revision=revision, pre=pre, post=post)
    if json_out:
        emit_json(result.to_json())
    else:
        out_console.print(f"[green]✓[/green] pushed {out} → {result.url}", highlight=False)
