"""CLI glue for PEFT adapters as POST: resolve the source, call :mod:`qkrestore.lora`, render.

All logic lives in ``qkrestore.lora``; this module only decides whether POST is an adapter, prints
and pushes. The commands hook in with one call each (merge/pro through ``cli_jobs.run_job``,
``inspect-layers`` and ``verify`` in ``cli.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from . import __version__
from .cli_common import ByteProgress, command_text, emit_json, human_console, note, out_console
from .errors import PlanError, QKRestoreError
from .hub import Source, download_files, fetch_post, parse_source, push_folder
from .lora import is_adapter_source
from .lora.config import CONFIG_NAME as ADAPTER_CONFIG


@dataclass(frozen=True)
class AdapterRequest:
    """What merge/pro pass on for the case where POST is a PEFT adapter."""

    method: str
    merge_adapter: bool = False
    fix: str = "key"
    ridge: float = 1.0
    device: str = "auto"


def adapter_post(post: str) -> tuple[Source, Path] | None:
    """POST's source and local folder when it is a PEFT adapter, else ``None``.

    A Hub POST is probed by fetching ``adapter_config.json`` alone, so that a full checkpoint's
    dry run still downloads nothing; an adapter repo is then fetched whole (it is small).
    """
    src = parse_source(post)
    if not src.is_hub:
        return (src, Path(post)) if is_adapter_source(post) else None
    try:
        probe = download_files(src, [ADAPTER_CONFIG])
    except QKRestoreError:
        return None  # the ordinary path reports an unreachable or missing repo
    if not (probe / ADAPTER_CONFIG).is_file():
        return None
    return src, fetch_post(src)


def run_adapter(pre: str, post: str, job: Any, opts: Any, request: AdapterRequest) -> bool:
    """Run the job on an adapter POST; ``False`` (nothing done) when POST is not an adapter."""
    from .lora import run_adapter_job

    found = adapter_post(post)
    if found is None:
        if request.merge_adapter:
            raise PlanError(f"--merge-adapter: POST {post} is not a PEFT adapter folder")
        return False
    post_src, post_root = found
    if opts.link:
        note("--link has no effect when POST is an adapter (OUT shares no file with it)", job.quiet)
    pre_src = parse_source(pre)
    # An adapter job needs PRE's whole weights (model out) or most of them (shape checks).
    pre_root = fetch_post(pre_src) if pre_src.is_hub else Path(pre)
    enabled = not job.quiet and not job.json_out and request.merge_adapter
    total = sum(f.stat().st_size for f in pre_root.glob("*.safetensors")) if enabled else 0
    with ByteProgress(request.method, total, enabled) as bar:
        result = run_adapter_job(
            pre_root,
            post_root,
            job.output,
            method=request.method,
            merge_adapter=request.merge_adapter,
            layers=opts.layers,
            include_sliding=opts.include_sliding,
            targets=opts.targets,
            fix=request.fix,
            ridge=request.ridge,
            device=request.device,
            adapter_options=opts.adapter_options,
            tensor_pattern=opts.tensor_pattern,
            overwrite=opts.overwrite,
            dry_run=job.dry_run,
            expect_layers=job.expect_layers,
            pre_source=pre_src.display,
            post_source=post_src.display,
            command=command_text(),
            progress=bar.advance,
        )
    for n in result.notes:
        note(n, job.quiet)
    summary = result.to_json()
    human = human_console(job.json_out, job.quiet)
    if human and (job.dry_run or job.verbose):
        human.print(actions_table(summary["adapter_plan"]["modules"]))
    if job.dry_run:
        if human:
            human.print(f"dry run: nothing written; OUT would be {job.output}")
    elif job.push_to_hub:
        summary["pushed"] = push_folder(
            result.out,
            job.push_to_hub,
            private=job.private,
            revision=job.revision,
            message=f"{result.plan.method} on a LoRA adapter with qkrestore {__version__}",
        )
    if job.json_out:
        emit_json(summary)
    elif human and not job.dry_run:
        counts = summary["adapter_plan"]["counts"]
        what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        kind = "model" if request.merge_adapter else "adapter"
        human.print(
            f"[green]✓[/green] {kind} written ({what}; layers "
            f"{', '.join(map(str, result.plan.layers))}) → {result.out}",
            highlight=False,
        )
        if "pushed" in summary:
            human.print(f"[green]✓[/green] pushed to {summary['pushed']}", highlight=False)
    return True


def actions_table(modules: list[dict[str, Any]]) -> Table:
    table = Table(title="adapter modules")
    for col in ("layer", "module", "action", "target", "rows"):
        table.add_column(col, overflow="fold")
    for m in modules:
        rows = m.get("rows") or []
        text = ", ".join(f"{a}:{b}" for a, b in rows[:4]) + (" …" if len(rows) > 4 else "")
        layer = m.get("layer")
        table.add_row(
            "" if layer is None else str(layer),
            m["module"],
            m.get("action", ""),
            m.get("target", ""),
            text,
        )
    return table


def inspect_adapter_cli(model: Path, base: Path | None, json_out: bool) -> bool:
    """``inspect-layers ADAPTER [--base PRE]``; ``False`` when MODEL is not an adapter."""
    if not is_adapter_source(model):
        if base is not None:
            raise PlanError(f"--base: {model} is not a PEFT adapter folder")
        return False
    from .lora import inspect_adapter
    from .lora.config import read_adapter_config

    named = read_adapter_config(model).base_model
    if base is None and named and Path(named).is_dir():
        base = Path(named)  # the adapter names a local base: plan against it
    doc = inspect_adapter(model, base)
    if json_out:
        emit_json(doc)
        return True
    c = out_console
    c.print(
        f"[bold]{doc['path']}[/bold]\nPEFT LoRA adapter   base_model: {doc['base_model']}   "
        f"DoRA: {doc['use_dora']}   rsLoRA: {doc['use_rslora']}   "
        f"{len(doc['modules'])} modules, {doc['adapter_bytes']:,} bytes",
        highlight=False,
    )
    if base is None:
        note("layer kinds come from the base model's config: pass --base PRE to see the plan")
    else:
        c.print(
            f"base: {doc['base']}   model_type: {doc['model_type']}   "
            f"global softmax: {doc['global_layers']}",
            highlight=False,
        )
    c.print(actions_table(doc["modules"]))
    return True


def verify_adapter_cli(out: Path, pre: Path | None, post: Path | None, json_out: bool) -> bool:
    """``verify OUT`` for an adapter job's output; ``False`` when OUT is not one."""
    import json

    from .writer import PROVENANCE_NAME

    path = out / PROVENANCE_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the ordinary verify reports a missing or broken record
    from .lora import is_adapter_record, verify_adapter_output

    if not isinstance(record, dict) or not is_adapter_record(record):
        return False
    report = verify_adapter_output(out, record, pre, post)
    if json_out:
        emit_json(report)
    else:
        out_console.print(
            f"[green]✓[/green] {out}: {report['tensors_checked']} tensors of the "
            f"{report['output_kind']} output match PRE and the input adapter",
            highlight=False,
        )
    return True
