"""The restore pipeline: sources → plan → computed rows → write → card and provenance → push.

One function, :func:`run_job`, runs a :class:`~qkrestore.methods.Method` on two sources. The CLI, the
Python API and the evaluation loop all call it; what differs between them (printing notes, drawing a
progress bar, the command line recorded in the card) comes in through :class:`Hooks`. Nothing here
prints, and nothing branches on which method runs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .card import SourceRecord, command_line, write_card_and_provenance
from .carried import check_carry, write_carried
from .checkpoint import INDEX_NAME, Checkpoint
from .errors import OutputError, PlanError, QKRestoreError
from .hub import (
    FOREIGN_WEIGHTS,
    META_FILES,
    Source,
    check_push_login,
    download_list,
    fetch_post,
    fetch_pre,
    hub_id_for,
    metadata_view,
    parse_source,
    push_folder,
)
from .lora import adapter_source
from .methods import Computed, Method
from .plan import RestorePlan, pre_names_for, pre_only_tensors
from .writer import WriteOptions, WriteResult, check_output_location, preflight, write_output

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]


@dataclass(frozen=True)
class JobOptions:
    """What a job does beyond planning: where OUT goes, how it is written, what happens after."""

    output: Path
    dry_run: bool = False
    expect_layers: list[int] | None = None
    write: WriteOptions = field(default_factory=WriteOptions)
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    pre_id: str | None = (
        None  # the Hub ids the card names the sources by, when they cannot be found
    )
    post_id: str | None = None
    record_paths: bool = False  # keep absolute local paths in the command and provenance
    pre_weights: str | None = None  # which weight set to read where a folder holds two
    post_weights: str | None = None
    merge_adapter: bool = False  # POST a PEFT adapter: write a full checkpoint, not an adapter


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


@dataclass
class Hooks:
    """How a running job reaches its caller. The defaults keep everything silent."""

    note: Callable[[str], None] = lambda message: None
    on_plan: Callable[[RestorePlan], None] = lambda plan: None
    progress: ProgressFactory = _no_progress
    command: str | None = None  # recorded in the card and provenance; default: this process's argv


@dataclass
class JobResult:
    """What a job did: its plan, and the document ``--json`` prints (``summary``)."""

    plan: RestorePlan
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return Path(self.summary["output"])

    @property
    def dry_run(self) -> bool:
        return bool(self.summary["dry_run"])

    def to_json(self) -> dict[str, Any]:
        return self.summary


class _Notes:
    """Notes are both passed on as they happen and kept for the result."""

    def __init__(self, hook: Callable[[str], None]) -> None:
        self.kept: list[str] = []
        self.hook = hook

    def __call__(self, message: str) -> None:
        self.kept.append(message)
        self.hook(message)


def open_side(
    path: Path | str, label: str, *, partial: bool = False, weights: str | None = None
) -> Checkpoint:
    """Open one side of a job; errors name the side (PRE/POST/OUT) they come from.

    Only the weight set the loader reads is opened (``weights`` picks one where there are two).
    """
    try:
        return Checkpoint.open(path, partial=partial, weights=weights)
    except QKRestoreError as exc:
        exc.message = f"{label}: {exc.message}"
        raise


def checked_plan(
    method: Method, pre: Checkpoint, post: Checkpoint, options: JobOptions
) -> RestorePlan:
    """The method's plan, refused unless its layers are the ones ``expect_layers`` names, and
    unless the files can give everything it needs (every refusal before anything is printed)."""
    plan = method.plan(pre, post)
    preflight(plan, pre, post)
    check_carry(plan, post)
    if options.expect_layers is not None and plan.layers != options.expect_layers:
        raise PlanError(
            f"expected softmax-attention layers {options.expect_layers}, but the plan has "
            f"{plan.layers}",
            hint="is this the model the recipe was written for?",
        )
    return plan


def run_job(
    pre: str,
    post: str,
    method: Method,
    options: JobOptions,
    hooks: Hooks | None = None,
) -> JobResult:
    """Run ``method`` on PRE and POST (folders or Hub ids) and write, or only plan, OUT."""
    hooks = hooks or Hooks()
    notes = _Notes(hooks.note)
    if options.push_to_hub and not options.dry_run:
        check_push_login(options.push_to_hub)  # before any work, not after OUT is written
    adapter = adapter_source(post)
    if adapter is not None:
        return _adapter_job(pre, adapter, method, options, hooks, notes)
    if options.merge_adapter:
        raise PlanError(f"--merge-adapter: POST {post} is not a PEFT adapter folder")
    pre_src, post_src = parse_source(pre), parse_source(post)
    if options.dry_run and (pre_src.is_hub or post_src.is_hub):
        return _hub_dry_run(pre_src, post_src, method, options, hooks, notes)
    output = options.output
    with open_side(fetch_post(post_src), "POST", weights=options.post_weights) as post_ck:

        def needed(meta: Path) -> list[str]:
            # What PRE must supply is known from POST and PRE's index, before PRE's shards arrive.
            index = json.loads((meta / INDEX_NAME).read_text(encoding="utf-8"))
            pre_names = index.get("weight_map", {})
            names = pre_names_for(method.plan(post_ck, post_ck), post_ck, pre_names)
            if method.options.carry_missing:
                names += pre_only_tensors(pre_names, post_ck.tensors).values()
            return names

        pre_root = fetch_pre(pre_src, needed)
        with open_side(
            pre_root, "PRE", partial=pre_src.is_hub, weights=options.pre_weights
        ) as pre_ck:
            # Output problems are the cheapest to find: report them before any planning.
            check_output_location(output.absolute(), {"PRE": pre_ck.root, "POST": post_ck.root})
            if not options.dry_run and output.exists() and not options.write.overwrite:
                raise OutputError(
                    f"{output}: already exists", hint="pass --overwrite to replace it"
                )
            if pre_ck.root.resolve() == post_ck.root.resolve():
                notes("PRE and POST are the same folder: the output will equal POST")
            plan = checked_plan(method, pre_ck, post_ck, options)
            defects = [*pre_ck.defects, *post_ck.defects]
            for n in [*plan.notes, *defects]:
                notes(n)
            summary: dict[str, Any] = {
                "ok": True,
                "method": plan.method,
                "dry_run": options.dry_run,
                "output": str(output),
                "sources": {
                    "pre": {"source": pre, "path": str(pre_ck.root)},
                    "post": {"source": post, "path": str(post_ck.root)},
                },
                "layers": plan.layers,
                "tensors": len(plan.patches),
                "missing_in_post": plan.missing_in_post,
                "restored_bytes": plan.restored_bytes(post_ck),
                "touched_files": plan.touched_files,
                "weight_files": {"pre": pre_ck.weight_files(), "post": post_ck.weight_files()},
                "defects": defects,
                "plan": plan.to_json(),
            }
            hooks.on_plan(plan)
            if options.dry_run:
                return JobResult(plan, summary, notes.kept)
            sources = (
                _source_record("PRE", pre_src, pre_ck, options.pre_id, notes),
                _source_record("POST", post_src, post_ck, options.post_id, notes),
            )
            result = _write(plan, method, pre_ck, post_ck, sources, options, hooks, notes, summary)
    for skipped in result.skipped:
        notes(f"not copied from POST (weights outside the set the loader reads): {skipped}")
    _push(result.out, plan.method, options, summary)
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
    return JobResult(plan, summary, notes.kept)


def _push(out: Path, what: str, options: JobOptions, summary: dict[str, Any]) -> None:
    """Upload OUT after a successful write, when asked; the commit URL goes into the summary."""
    if options.push_to_hub and not options.dry_run:
        summary["pushed"] = push_folder(
            out,
            options.push_to_hub,
            private=options.private,
            revision=options.revision,
            message=f"{what} with qkrestore {__version__}",
        )


def _adapter_job(
    pre: str,
    found: tuple[Source, Path],
    method: Method,
    options: JobOptions,
    hooks: Hooks,
    notes: _Notes,
) -> JobResult:
    """POST is a PEFT adapter: the method runs on POST = PRE + adapter (see :mod:`qkrestore.lora`),
    writing an adapter (default) or, with ``merge_adapter``, a full checkpoint."""
    from .lora import run_adapter_job

    post_src, post_root = found
    params = method.solver_params()
    if params.get("form", "ridge") != "ridge":
        raise PlanError(
            f"--form {params['form']}: QK-Pro on a PEFT adapter has the ridge form only"
        )
    if options.write.link:
        notes("--link has no effect when POST is an adapter (OUT shares no file with it)")
    pre_src = parse_source(pre)
    # An adapter job needs PRE's whole weights (model out) or most of them (shape checks).
    pre_root = fetch_post(pre_src) if pre_src.is_hub else Path(pre)
    with open_side(pre_root, "PRE", weights=options.pre_weights) as pre_ck:
        pre_id = options.pre_id or hub_id_for(pre_src, pre_ck.root, pre_ck.config)
        total = pre_ck.total_bytes if options.merge_adapter else 0
    post_id = options.post_id or post_src.repo_id
    opts = method.options
    with hooks.progress(method.name, total) as advance:
        result = run_adapter_job(
            pre_root,
            post_root,
            options.output,
            method=method.name,
            merge_adapter=options.merge_adapter,
            layers=opts.layers,
            include_sliding=opts.include_sliding,
            targets=opts.targets,
            fix=params.get("fix", "key"),
            ridge=params.get("ridge", 1.0),
            device=params.get("device", "auto"),
            adapter_options=dict(opts.adapter_options),
            tensor_pattern=opts.tensor_pattern,
            overwrite=options.write.overwrite,
            dry_run=options.dry_run,
            expect_layers=options.expect_layers,
            pre_source=pre,
            post_source=post_src.repo_id or str(post_root),
            pre_id=pre_id,
            post_id=post_id,
            record_paths=options.record_paths,
            command=hooks.command or command_line(),
            progress=advance,
        )
    for n in result.notes:
        notes(n)
    summary = result.to_json()
    _push(result.out, f"{result.plan.method} on a LoRA adapter", options, summary)
    return JobResult(result.plan, summary, notes.kept)


def _source_record(
    label: str, source: Source, ck: Checkpoint, given_id: str | None, notes: _Notes
) -> SourceRecord:
    """How OUT names a source: the id the user gave, else one found (see ``hub_id_for``)."""
    hub_id = given_id or hub_id_for(source, ck.root, ck.config)
    if hub_id is None:
        flag = "--pre-id" if label == "PRE" else "--post-id"
        notes(
            f"no Hub id is known for {label} ({ck.root.name}): the model card names it as a local "
            f"folder and leaves it out of base_model (pass {flag} org/name to name it)"
        )
    return SourceRecord(hub_id, ck.root.absolute())


def _write(
    plan: RestorePlan,
    method: Method,
    pre: Checkpoint,
    post: Checkpoint,
    sources: tuple[SourceRecord, SourceRecord],
    options: JobOptions,
    hooks: Hooks,
    notes: _Notes,
    summary: dict[str, Any],
) -> WriteResult:
    """The method's computed rows, then OUT with its card and provenance, atomically."""
    command = hooks.command or command_line()

    def finalize(folder: Path, result: WriteResult) -> None:
        if plan.carried:
            result.tensor_sha256.update(write_carried(folder, plan, pre))
        write_card_and_provenance(
            folder,
            plan,
            result,
            pre=sources[0],
            post=sources[1],
            command=command,
            record_paths=options.record_paths,
        )

    computed: Computed | None = method.compute(plan, pre, post, options.output.absolute().parent)
    try:
        if computed is not None and computed.stats:
            summary["solve"] = computed.stats
            s = computed.stats
            notes(
                f"solved {s['systems']} head systems in {s['layers']} layers on {s['device']} in "
                f"{s['seconds']:.3f} s"
            )
        with hooks.progress(plan.method, post.total_bytes) as advance:
            return write_output(
                plan,
                pre,
                post,
                options.output,
                overwrite=options.write.overwrite,
                link=options.write.link,
                jobs=options.write.jobs,
                computed=computed,
                finalize=finalize,
                progress=advance,
            )
    finally:
        if computed is not None:
            computed.close()


def _hub_dry_run(
    pre_src: Source,
    post_src: Source,
    method: Method,
    options: JobOptions,
    hooks: Hooks,
    notes: _Notes,
) -> JobResult:
    """Plan from headers and list what each side would download, fetching no weights."""
    post_ck, pre_ck = metadata_view(post_src), metadata_view(pre_src)
    plan = checked_plan(method, pre_ck, post_ck, options)
    for n in plan.notes:
        notes(n)
    pre_files = sorted({pre_ck.tensors[p.pre_name].file for p in plan.patches})
    downloads = {
        "post": download_list(post_src, ignore=FOREIGN_WEIGHTS),
        "pre": download_list(pre_src, allow=[*META_FILES, *pre_files]),
    }
    summary = {
        "ok": True,
        "method": plan.method,
        "dry_run": True,
        "output": str(options.output),
        "layers": plan.layers,
        "tensors": len(plan.patches),
        "downloads": downloads,
        "plan": plan.to_json(),
    }
    hooks.on_plan(plan)
    return JobResult(plan, summary, notes.kept)


__all__ = ["Hooks", "JobOptions", "JobResult", "open_side", "run_job"]
