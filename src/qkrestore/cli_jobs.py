"""The merge/pro job as the CLI runs it: sources, early checks, plan, dry run, write, push, summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from . import __version__
from .checkpoint import Checkpoint
from .cli_common import (
    ByteProgress,
    command_text,
    emit_json,
    human_console,
    note,
    open_checkpoint,
    plan_table,
)
from .cli_lora import AdapterRequest, run_adapter
from .errors import (
    OutputError,
    PlanError,
)
from .hub import (
    FOREIGN_WEIGHTS,
    META_FILES,
    Source,
    download_list,
    fetch_post,
    fetch_pre,
    metadata_view,
    parse_source,
    push_folder,
)
from .merge import MergeOptions, execute
from .plan import METHOD_PRO, RestorePlan, parse_layers, pre_names_for
from .writer import WriteResult, check_output_location


@dataclass
class JobFlags:
    """The options merge and pro share beyond planning."""

    output: Path
    dry_run: bool
    json_out: bool
    quiet: bool
    verbose: bool
    expect_layers: list[int] | None
    push_to_hub: str | None
    private: bool
    revision: str | None


def parse_expect(text: str | None) -> list[int] | None:
    return None if text is None else parse_layers(text)


def _needed_pre_names(
    meta: Path,
    post_ck: Checkpoint,
    make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan],
) -> list[str]:
    """Names of the tensors PRE must supply, known from PRE's index before its shards are fetched."""
    index = json.loads((meta / "model.safetensors.index.json").read_text(encoding="utf-8"))
    return pre_names_for(make_plan(post_ck, post_ck), post_ck, index.get("weight_map", {}))


def _checked_plan(
    make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan],
    pre_ck: Checkpoint,
    post_ck: Checkpoint,
    job: JobFlags,
) -> RestorePlan:
    """The plan, refused unless its layers are the ones ``--expect-layers`` (or a recipe) names."""
    plan = make_plan(pre_ck, post_ck)
    if job.expect_layers is not None and plan.layers != job.expect_layers:
        raise PlanError(
            f"expected softmax-attention layers {job.expect_layers}, but the plan has "
            f"{plan.layers}",
            hint="is this the model the recipe was written for?",
        )
    return plan


def run_job(
    pre: str,
    post: str,
    job: JobFlags,
    opts: MergeOptions,
    make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan],
    adapter: AdapterRequest | None = None,
) -> None:
    """Shared by merge and pro: resolve sources, plan, print or write, push, summarise."""
    if adapter is not None and run_adapter(pre, post, job, opts, adapter):
        return  # POST was a PEFT adapter: qkrestore.lora did the job
    human = human_console(job.json_out, job.quiet)
    pre_src, post_src = parse_source(pre), parse_source(post)
    output = job.output
    if job.dry_run and (pre_src.is_hub or post_src.is_hub):
        _hub_dry_run(pre_src, post_src, job, make_plan)
        return
    with open_checkpoint(fetch_post(post_src), "POST") as post_ck:
        pre_root = fetch_pre(pre_src, lambda meta: _needed_pre_names(meta, post_ck, make_plan))
        with open_checkpoint(pre_root, "PRE", partial=pre_src.is_hub) as pre_ck:
            # Output problems are the cheapest to find: report them before any planning.
            check_output_location(output.absolute(), {"PRE": pre_ck.root, "POST": post_ck.root})
            if not job.dry_run and output.exists() and not opts.overwrite:
                raise OutputError(
                    f"{output}: already exists", hint="pass --overwrite to replace it"
                )
            if pre_ck.root.resolve() == post_ck.root.resolve():
                note(
                    "PRE and POST are the same folder: the output will equal POST",
                    job.quiet,
                )
            plan = _checked_plan(make_plan, pre_ck, post_ck, job)
            for n in plan.notes:
                note(n, job.quiet)
            summary: dict[str, Any] = {
                "ok": True,
                "method": plan.method,
                "dry_run": job.dry_run,
                "output": str(output),
                "sources": {
                    "pre": {"source": pre, "path": str(pre_ck.root)},
                    "post": {"source": post, "path": str(post_ck.root)},
                },
                "layers": plan.layers,
                "tensors": len(plan.patches),
                "restored_bytes": plan.restored_bytes(post_ck),
                "touched_files": plan.touched_files,
                "plan": plan.to_json(),
            }
            if human and (job.dry_run or job.verbose):
                human.print(plan_table(plan, post_ck))
            if job.dry_run:
                if human:
                    human.print(f"dry run: nothing written; OUT would be {output}")
                if job.json_out:
                    emit_json(summary)
                return
            result = _write(plan, pre_ck, post_ck, output, opts, job, pre_src, post_src, summary)
    for skipped in result.skipped:
        note(f"not copied from POST (another weight format): {skipped}", job.quiet)
    summary.update(
        {
            "output": str(result.out),
            "files": len(result.files),
            "linked_files": result.linked,
            "skipped_files": result.skipped,
            "bytes_read_from_pre": result.bytes_from_pre,
            "tensor_sha256": result.tensor_sha256,
        }
    )
    if job.push_to_hub:
        summary["pushed"] = push_folder(
            result.out,
            job.push_to_hub,
            private=job.private,
            revision=job.revision,
            message=f"{plan.method} with qkrestore {__version__}",
        )
    if job.json_out:
        emit_json(summary)
    elif human:
        verb = "solved" if plan.method == METHOD_PRO else "restored"
        human.print(
            f"[green]✓[/green] {verb} {len(plan.patches)} tensors in layers "
            f"{', '.join(map(str, plan.layers))} → {result.out}",
            highlight=False,
        )
        if "pushed" in summary:
            human.print(f"[green]✓[/green] pushed to {summary['pushed']}", highlight=False)


def _hub_dry_run(
    pre_src: Source,
    post_src: Source,
    job: JobFlags,
    make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan],
) -> None:
    """Plan from headers and list what each side would download, fetching no weights."""
    post_ck, pre_ck = metadata_view(post_src), metadata_view(pre_src)
    plan = _checked_plan(make_plan, pre_ck, post_ck, job)
    pre_files = sorted({pre_ck.tensors[p.pre_name].file for p in plan.patches})
    downloads = {
        "post": download_list(post_src, ignore=FOREIGN_WEIGHTS),
        "pre": download_list(pre_src, allow=[*META_FILES, *pre_files]),
    }
    summary = {
        "ok": True,
        "method": plan.method,
        "dry_run": True,
        "output": str(job.output),
        "layers": plan.layers,
        "tensors": len(plan.patches),
        "downloads": downloads,
        "plan": plan.to_json(),
    }
    human = human_console(job.json_out, job.quiet)
    if human:
        human.print(plan_table(plan, post_ck))
        table = Table(title="files to download")
        for col in ("side", "file", "size", "cached"):
            table.add_column(col)
        for side, files in downloads.items():
            for f in files:
                size = f"{f['size'] / 2**20:,.1f} MiB" if f["size"] is not None else "?"
                table.add_row(side, f["file"], size, "yes" if f["cached"] else "no")
        human.print(table)
        human.print(f"dry run: nothing downloaded or written; OUT would be {job.output}")
    if job.json_out:
        emit_json(summary)


def _write(
    plan: RestorePlan,
    pre_ck: Checkpoint,
    post_ck: Checkpoint,
    output: Path,
    opts: MergeOptions,
    job: JobFlags,
    pre_src: Source,
    post_src: Source,
    summary: dict[str, Any],
) -> WriteResult:
    store = None
    try:
        if plan.method == METHOD_PRO:
            from .pro import ComputedStore
            from .pro import solve as solve_pro

            parent = output.absolute().parent
            if not parent.is_dir():
                raise OutputError(f"{parent}: the folder for OUT does not exist")
            store = ComputedStore(parent)
            t0 = time.perf_counter()
            stats = solve_pro(plan, pre_ck, post_ck, store)
            stats["seconds"] = round(time.perf_counter() - t0, 4)
            summary["solve"] = stats
            note(
                f"solved {stats['systems']} head systems in {stats['layers']} layers on "
                f"{stats['device']} in {stats['seconds']:.3f} s",
                job.quiet or job.json_out,
            )
        with ByteProgress(
            plan.method, post_ck.total_bytes, not job.quiet and not job.json_out
        ) as bar:
            return execute(
                plan,
                pre_ck,
                post_ck,
                output,
                opts,
                pre_source=pre_src.display,
                post_source=post_src.display,
                computed=store,
                progress=bar.advance,
                command=command_text(),
            )
    finally:
        if store is not None:
            store.close()
