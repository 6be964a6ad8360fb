"""The restore pipeline: sources → plan → computed rows → write → card and provenance → push.

One function, :func:`run_job`, runs a :class:`~qkrestore.surgery.methods.Method` on two sources
(POST a checkpoint or a PEFT adapter). The CLI, the Python API and the scripts call it; the
evaluation loop applies the same method objects' rows to a loaded model instead of writing them.
What differs between callers (printing notes, drawing a progress bar, the command line recorded in
the card) comes in through :class:`Hooks`. Nothing here
prints, and nothing branches on which method runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .adapter import adapter_source
from .errors import OutputError, PlanError, QKRestoreError
from .io.checkpoint import INDEX_NAME, Checkpoint
from .io.hub import (
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
from .surgery.card import (
    ADAPTER,
    CHECKPOINT,
    MERGED_ADAPTER,
    CardInput,
    SourceRecord,
    command_line,
    write_card_and_provenance,
)
from .surgery.carried import check_carry, write_carried
from .surgery.methods import Method
from .surgery.plan import RestorePlan, pre_names_for, pre_only_tensors
from .surgery.writer import (
    WriteOptions,
    WriteResult,
    check_output_location,
    preflight,
    write_output,
)

if TYPE_CHECKING:
    from .adapter.plan import AdapterPlan
    from .adapter.reader import LoraAdapter

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], AbstractContextManager[Advance]]


@dataclass(frozen=True)
class JobOptions:
    """What a job does beyond planning: where OUT goes, how it is written, what happens after.

    Fields with ``flags`` metadata are options of the one option model (:mod:`qkrestore.options`);
    ``write`` holds the writing options (:class:`WriteOptions`), ``output`` is the job's operand.
    """

    output: Path
    dry_run: bool = field(
        default=False,
        metadata={"flags": ("--dry-run",), "help": "Print the plan; write nothing."},
    )
    expect_layers: list[int] | None = field(
        default=None,
        metadata={
            "flags": ("--expect-layers",),
            "help": "Refuse to run unless the planned layers are exactly these (recipes use it "
            "as a check).",
            "parse": "layers",
        },
    )
    write: WriteOptions = field(default_factory=WriteOptions, metadata={"nested": True})
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "flags": ("--push-to-hub",),
            "parse": "repo_id",
            "help": "After success, upload OUT to this Hub repo id.",
        },
    )
    private: bool = field(
        default=False,
        metadata={"flags": ("--private",), "help": "Create the Hub repo as private."},
    )
    revision: str | None = field(
        default=None,
        metadata={"flags": ("--revision",), "help": "Hub branch to push to (created if needed)."},
    )
    pre_id: str | None = field(  # the Hub ids the card names the sources by, when not found
        default=None,
        metadata={
            "flags": ("--pre-id",),
            "parse": "repo_id",
            "help": "Hub id to name PRE by in the model card's base_model, when it is a local "
            "folder that the tool cannot tie to one (found from the HF cache or config otherwise).",
        },
    )
    post_id: str | None = field(
        default=None,
        metadata={
            "flags": ("--post-id",),
            "parse": "repo_id",
            "help": "Hub id to name POST by in the model card (see --pre-id).",
        },
    )
    record_paths: bool = field(  # keep absolute local paths in the command and provenance
        default=False,
        metadata={
            "flags": ("--record-paths",),
            "help": "Keep the sources' absolute local paths in qkrestore.json and the recorded "
            "command (by default only Hub ids and folder names are written, so a push leaks no "
            "local paths).",
        },
    )
    pre_weights: str | None = field(  # which weight set to read where a folder holds two
        default=None,
        metadata={
            "flags": ("--pre-weights",),
            "help": "Where PRE holds two weight sets: the one to read (model.safetensors or an "
            "index).",
        },
    )
    post_weights: str | None = field(
        default=None,
        metadata={
            "flags": ("--post-weights",),
            "help": "Where POST holds two weight sets: the one to restore (model.safetensors or "
            "an index); OUT holds only that one.",
        },
    )
    merge_adapter: bool = field(  # POST a PEFT adapter: write a full checkpoint, not an adapter
        default=False,
        metadata={
            "flags": ("--merge-adapter",),
            "help": "When POST is a PEFT adapter: write a full checkpoint (PRE + adapter merged) "
            "instead of an adapter.",
        },
    )


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
    """Run ``method`` on PRE and POST (folders or Hub ids) and write, or only plan, OUT.

    POST is a checkpoint or a PEFT adapter (an input kind: POST = PRE + adapter, which has PRE's
    layout). Either way PRE is opened once with the same options, the method object plans (and
    computes), OUT is checked once, and the output is written through the writer's staging folder,
    fsync and atomic rename, with the one card and provenance writer.
    """
    hooks = hooks or Hooks()
    notes = _Notes(hooks.note)
    if options.push_to_hub and not options.dry_run:
        check_push_login(options.push_to_hub)  # before any work, not after OUT is written
    pre_src, post_src = parse_source(pre), parse_source(post)
    found = adapter_source(post)
    if found is None and options.merge_adapter:
        raise PlanError(f"--merge-adapter: POST {post} is not a PEFT adapter folder")
    if found is None and options.dry_run and (pre_src.is_hub or post_src.is_hub):
        return _hub_dry_run(pre_src, post_src, method, options, hooks, notes)
    with contextlib.ExitStack() as stack:
        adapter: LoraAdapter | None = None
        if found is None:
            post_ck = stack.enter_context(
                open_side(fetch_post(post_src), "POST", weights=options.post_weights)
            )
            pre_root = fetch_pre(pre_src, _pre_needs(method, post_ck))
            post_root = post_ck.root
        else:
            from .adapter.job import open_adapter_input

            post_src, post_root = found
            adapter = stack.enter_context(open_adapter_input(post_root))
            if options.write.link:
                notes("--link has no effect when POST is an adapter (OUT shares no file with it)")
            # An adapter job needs PRE's whole weights (model out) or most of them (shape checks).
            pre_root = fetch_post(pre_src) if pre_src.is_hub else Path(pre)
        pre_ck = stack.enter_context(
            open_side(
                pre_root,
                "PRE",
                partial=pre_src.is_hub and adapter is None,
                weights=options.pre_weights,
            )
        )
        # POST = PRE + adapter has PRE's layout: an adapter job plans with PRE on both sides.
        layout = post_ck if adapter is None else pre_ck
        _check_output(options, {"PRE": pre_ck.root, "POST": post_root}, notes)
        plan = checked_plan(method, pre_ck, layout, options)
        aplan = None
        if adapter is not None:
            from .adapter.job import plan_adapter_job

            aplan, adapter_notes = plan_adapter_job(
                adapter, plan, pre_ck, pre, options.merge_adapter
            )
            plan.notes = [*adapter_notes, *plan.notes]
        defects = [*pre_ck.defects, *(layout.defects if adapter is None else [])]
        for n in [*plan.notes, *defects]:
            notes(n)
        summary: dict[str, Any] = {
            "ok": True,
            "method": plan.method,
            "dry_run": options.dry_run,
            "output": str(options.output),
            "sources": {
                "pre": {"source": pre_src.repo_id or pre, "path": str(pre_ck.root)},
                "post": {"source": post_src.repo_id or post, "path": str(post_root)},
            },
            "layers": plan.layers,
            "tensors": len(plan.patches),
            "missing_in_post": plan.missing_in_post,
            "restored_bytes": plan.restored_bytes(layout),
            "touched_files": plan.touched_files,
            "weight_files": {"pre": pre_ck.weight_files(), "post": layout.weight_files()},
            "defects": defects,
            "plan": plan.to_json(),
        }
        if aplan is not None:
            summary |= {
                "input": "peft-adapter",
                "output_kind": MERGED_ADAPTER if options.merge_adapter else ADAPTER,
                "adapter_plan": aplan.to_json(),
                "notes": list(notes.kept),
            }
            summary["sources"]["post"]["adapter"] = True
        hooks.on_plan(plan)
        if options.dry_run:
            return JobResult(plan, summary, notes.kept)
        sources = (
            _source_record("PRE", pre_src, pre_ck, options.pre_id, notes),
            _post_record(post_src, post_root, layout, adapter, options.post_id, notes),
        )
        card = CardInput(
            kind=CHECKPOINT,
            plan=plan,
            pre=sources[0],
            post=sources[1],
            command=hooks.command or command_line(),
            title=method.title,
            explanation=method.explanation,
            record_paths=options.record_paths,
        )
        if adapter is None:
            result = _write(card, method, pre_ck, post_ck, options, hooks, notes, summary)
        else:
            assert aplan is not None
            result = _write_from_adapter(
                card, method, pre_ck, adapter, aplan, options, hooks, notes, summary
            )
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


def _pre_needs(method: Method, post_ck: Checkpoint) -> Callable[[Path], list[str]]:
    """What PRE must supply, known from POST and PRE's index before PRE's shards arrive."""

    def needed(meta: Path) -> list[str]:
        index = json.loads((meta / INDEX_NAME).read_text(encoding="utf-8"))
        pre_names = index.get("weight_map", {})
        names = pre_names_for(method.plan(post_ck, post_ck), post_ck, pre_names)
        if method.options.carry_missing:
            names += pre_only_tensors(pre_names, post_ck.tensors).values()
        return names

    return needed


def _check_output(options: JobOptions, inputs: dict[str, Path], notes: _Notes) -> None:
    """OUT problems are the cheapest to find: reported before any planning, for every input kind."""
    output = options.output
    check_output_location(output.absolute(), inputs)
    if not options.dry_run and output.exists() and not options.write.overwrite:
        raise OutputError(f"{output}: already exists", hint="pass --overwrite to replace it")
    if inputs["PRE"].resolve() == inputs["POST"].resolve():
        notes("PRE and POST are the same folder: the output will equal POST")


def verify_for_push(out: Path, pre: Path | None = None, post: Path | None = None) -> None:
    """Re-check OUT against its plan, PRE and POST (bytes only, no forward pass) before it leaves
    this machine: a push publishes exactly what ``qkrestore verify`` passes, or nothing."""
    from .adapter.job import is_adapter_record, verify_adapter_output
    from .errors import VerifyError
    from .surgery.verification import read_provenance, verify_output

    record = read_provenance(out)
    if is_adapter_record(record):
        verify_adapter_output(out, record, pre, post)  # raises VerifyError on a mismatch
        return
    report = verify_output(out, pre, post, "never")
    if not report.ok:
        first = report.mismatches[0] if report.mismatches else "forward pass failed"
        raise VerifyError(
            f"{out}: not pushed, verification failed: {first}",
            hint=f"see 'qkrestore verify {out}'",
        )


def _push(out: Path, what: str, options: JobOptions, summary: dict[str, Any]) -> None:
    """Upload OUT after a successful write, when asked; the commit URL goes into the summary."""
    if options.push_to_hub and not options.dry_run:
        summary["pushed"] = push_folder(
            out,
            options.push_to_hub,
            private=options.private,
            revision=options.revision,
            message=f"{what} with qkrestore {__version__}",
            check=verify_for_push,
        )


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


def _post_record(
    source: Source,
    root: Path,
    layout: Checkpoint,
    adapter: LoraAdapter | None,
    given_id: str | None,
    notes: _Notes,
) -> SourceRecord:
    """POST's name in OUT: a checkpoint's as PRE's; an adapter's by its Hub repo or the id given."""
    if adapter is None:
        return _source_record("POST", source, layout, given_id, notes)
    return SourceRecord(given_id or source.repo_id, Path(root).absolute())


def _write(
    card: CardInput,
    method: Method,
    pre: Checkpoint,
    post: Checkpoint,
    options: JobOptions,
    hooks: Hooks,
    notes: _Notes,
    summary: dict[str, Any],
    *,
    link: bool | None = None,
) -> WriteResult:
    """The method's computed rows, then OUT with its card and provenance, atomically."""
    plan = card.plan

    def finalize(folder: Path, result: WriteResult) -> None:
        if plan.carried:
            result.tensor_sha256.update(write_carried(folder, plan, pre))
        write_card_and_provenance(folder, card, result)

    computed = method.compute(plan, pre, post, options.output.absolute().parent)
    try:
        if computed is not None and computed.stats:
            summary["solve"] = computed.stats
            _solve_note(computed.stats, notes)
        with hooks.progress(plan.method, post.total_bytes) as advance:
            return write_output(
                plan,
                pre,
                post,
                options.output,
                overwrite=options.write.overwrite,
                link=options.write.link if link is None else link,
                jobs=options.write.jobs,
                computed=computed,
                finalize=finalize,
                progress=advance,
            )
    finally:
        if computed is not None:
            computed.close()


def _solve_note(stats: dict[str, Any], notes: _Notes) -> None:
    seconds = f" in {stats['seconds']:.3f} s" if "seconds" in stats else ""
    notes(
        f"solved {stats['systems']} head systems in {stats['layers']} layers on "
        f"{stats['device']}{seconds}"
    )


def _write_from_adapter(
    card: CardInput,
    method: Method,
    pre: Checkpoint,
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    options: JobOptions,
    hooks: Hooks,
    notes: _Notes,
    summary: dict[str, Any],
) -> WriteResult:
    """OUT from PRE + a PEFT adapter: the edited adapter, or (``merge_adapter``) PRE + adapter
    merged into a full checkpoint and then treated exactly as a checkpoint POST."""
    from .adapter.job import merged_post, write_adapter_output
    from .adapter.write import is_local_path

    adapter_record: dict[str, Any] = {"adapter_plan": aplan.to_json()}
    out = options.output.absolute()
    if options.merge_adapter:
        card = dataclasses.replace(card, kind=MERGED_ADAPTER, adapter=adapter_record)
        with contextlib.ExitStack() as stack:
            with hooks.progress("merge", pre.total_bytes) as advance:
                merged_root = stack.enter_context(
                    merged_post(pre, adapter, out.parent, options.write.jobs, advance)
                )
            merged = stack.enter_context(open_side(merged_root, "POST (PRE + adapter merged)"))
            # The merged folder is ours and removed after: its untouched shards are linked.
            result = _write(card, method, pre, merged, options, hooks, notes, summary, link=True)
        result.linked = []
        summary["written"] = {"kind": MERGED_ADAPTER, "files": result.files}
        return result

    card = dataclasses.replace(card, kind=ADAPTER, adapter=adapter_record)

    def finalize(folder: Path, written: dict[str, Any]) -> None:
        adapter_record["written"] = written
        write_card_and_provenance(folder, card)

    written = write_adapter_output(
        options.output, options.write, pre, adapter, aplan, card.pre.hub_id, finalize
    )
    if "solve" in written:
        summary["solve"] = written["solve"]
        _solve_note(written["solve"], notes)
    base = adapter.config.base_model
    if card.pre.hub_id is None and base and is_local_path(base):
        notes(
            f"adapter_config.json: base_model_name_or_path is a local path ({Path(base).name}) and "
            "no Hub id is known for PRE: OUT leaves it out (pass --pre-id org/name to name it)"
        )
    summary["written"] = written
    return WriteResult(out=out, files=written["files"], skipped=[], tensor_sha256={})


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
