"""``merge`` and ``pro``: parse the options once into a method and job options, run the job, render.

The work itself is :func:`qkrestore.job.run_job`; this module only turns flags into option objects
and the job's result into lines, tables and JSON.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..job import Hooks, JobOptions, JobResult, run_job
from ..methods import Method, QKRestore
from ..plan import METHOD_PRO, PlanOptions, parse_layers, parse_targets
from ..writer import WriteOptions
from .options import (
    ArchOpt,
    CarryMissingOpt,
    DeviceChoice,
    DryRunOpt,
    ExpectOpt,
    FixOpt,
    FixSide,
    FormOpt,
    JobsOpt,
    JsonOpt,
    LayersOpt,
    LinkOpt,
    MergeAdapterOpt,
    MlaLatent,
    MlaLatentOpt,
    OutputOpt,
    OverwriteOpt,
    PatternOpt,
    PostArg,
    PostIdOpt,
    PostWeightsOpt,
    PreArg,
    PreIdOpt,
    PreWeightsOpt,
    PrivateOpt,
    PushOpt,
    QuietOpt,
    RecipeOpt,
    RecordPathsOpt,
    RevisionOpt,
    RidgeOpt,
    SlidingOpt,
    SolveDeviceOpt,
    TargetsOpt,
    VerboseOpt,
)
from .output import (
    EXIT_CODES_HELP,
    adapter_table,
    byte_progress,
    command_text,
    emit_json,
    human_console,
    note,
    plan_table,
)

MERGE_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore merge ./base ./sft -o ./sft-qkrestore
  qkrestore merge ./base ./sft -o ./out --layers 3,7,11 --dry-run
  qkrestore merge ./base ./sft -o ./out --targets q,k,v --overwrite --json

"""
    + EXIT_CODES_HELP
)

PRO_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore pro ./base ./sft -o ./sft-qkpro                     # --fix key --ridge 1.0
  qkrestore pro ./base ./sft -o ./out --fix query --ridge 0.1 --device cuda
  qkrestore pro ./base ./sft -o ./out --ridge 0 --dry-run        # ridge 0 is QK-Restore
  qkrestore pro ./base ./sft -o ./out --form cross-gram          # exact cross-Gram, no ridge

"""
    + EXIT_CODES_HELP
)


@dataclass(frozen=True)
class _Flags:
    """The options merge and pro share, read once from a command's parameters.

    :func:`_shared_options` adds them to both commands' signatures from :data:`_SHARED`, so each
    is declared once; the command itself declares only its method's own options.
    """

    output: Path
    layers: str
    include_sliding: bool
    allow_arch_mismatch: bool
    carry_missing: bool
    merge_adapter: bool
    dry_run: bool
    overwrite: bool
    link: bool
    jobs: int
    pre_weights: str | None
    post_weights: str | None
    expect_layers: str | None
    push_to_hub: str | None
    private: bool
    revision: str | None
    pre_id: str | None
    post_id: str | None
    record_paths: bool
    config: Path | None
    verbose: bool
    json_out: bool
    quiet: bool

    def plan_options(self, **method: Any) -> PlanOptions:
        """The planning options, with the method's own (targets, tensor pattern, …) added."""
        return PlanOptions(
            layers=parse_layers(self.layers),
            include_sliding=self.include_sliding,
            allow_arch_mismatch=self.allow_arch_mismatch,
            carry_missing=self.carry_missing,
            **method,
        )

    @property
    def job(self) -> JobOptions:
        return JobOptions(
            output=self.output,
            dry_run=self.dry_run,
            expect_layers=None if self.expect_layers is None else parse_layers(self.expect_layers),
            write=WriteOptions(overwrite=self.overwrite, link=self.link, jobs=self.jobs),
            push_to_hub=self.push_to_hub,
            private=self.private,
            revision=self.revision,
            pre_id=self.pre_id,
            post_id=self.post_id,
            record_paths=self.record_paths,
            pre_weights=self.pre_weights,
            post_weights=self.post_weights,
            merge_adapter=self.merge_adapter,
        )


# (name, Annotated type, default) of every option in _Flags but OUT, in --help order.
_SHARED: tuple[tuple[str, Any, Any], ...] = (
    ("layers", LayersOpt, "auto"),
    ("include_sliding", SlidingOpt, False),
    ("allow_arch_mismatch", ArchOpt, False),
    ("carry_missing", CarryMissingOpt, False),
    ("merge_adapter", MergeAdapterOpt, False),
    ("dry_run", DryRunOpt, False),
    ("overwrite", OverwriteOpt, False),
    ("link", LinkOpt, False),
    ("jobs", JobsOpt, 2),
    ("pre_weights", PreWeightsOpt, None),
    ("post_weights", PostWeightsOpt, None),
    ("expect_layers", ExpectOpt, None),
    ("push_to_hub", PushOpt, None),
    ("private", PrivateOpt, False),
    ("revision", RevisionOpt, None),
    ("pre_id", PreIdOpt, None),
    ("post_id", PostIdOpt, None),
    ("record_paths", RecordPathsOpt, False),
    ("config", RecipeOpt, None),
    ("verbose", VerboseOpt, False),
    ("json_out", JsonOpt, False),
    ("quiet", QuietOpt, False),
)


def _shared_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the shared options as parameters Typer sees, and hand them to it as one
    ``flags: _Flags`` argument (the command's own parameters pass through unchanged)."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.name != "flags"]
    kw = inspect.Parameter.KEYWORD_ONLY
    params += [inspect.Parameter(n, kw, default=d, annotation=t) for n, t, d in _SHARED]
    names = {f.name for f in fields(_Flags)}
    mine = {
        p.name for p in params[: len(own.parameters) - 1]
    }  # OUT is both the command's and flags'

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        flags = _Flags(**{k: v for k, v in kwargs.items() if k in names})
        command(**{k: v for k, v in kwargs.items() if k in mine}, flags=flags)

    run.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return run


@_shared_options
def merge(
    pre: PreArg,
    post: PostArg,
    output: OutputOpt,
    targets: TargetsOpt = "q,k",
    tensor_pattern: PatternOpt = None,
    mla_latent: MlaLatentOpt = MlaLatent.post,
    *,
    flags: _Flags,
) -> None:
    """QK-Restore: POST with the Q/K routing of its softmax-attention layers taken from PRE."""
    method = QKRestore(
        flags.plan_options(
            targets=tuple(parse_targets(targets)),
            tensor_pattern=tensor_pattern,
            adapter_options=mla_latent.adapter_options(),
        )
    )
    _run(pre, post, method, flags)


@_shared_options
def pro(
    pre: PreArg,
    post: PostArg,
    output: OutputOpt,
    fix: FixOpt = FixSide.key,
    ridge: RidgeOpt = 1.0,
    form: FormOpt = "ridge",
    device: SolveDeviceOpt = DeviceChoice.auto,
    *,
    flags: _Flags,
) -> None:
    """QK-Pro: hold one routing side at PRE and solve the other per head, in closed form."""
    from ..qkpro import QKPro  # torch is imported only by the jobs that compute

    method = QKPro(flags.plan_options(), fix=fix.value, ridge=ridge, device=device.value, form=form)
    _run(pre, post, method, flags)


def _run(pre: str, post: str, method: Method, flags: _Flags) -> None:
    human = human_console(flags.json_out, flags.quiet)
    job = flags.job
    show_plan = human is not None and (job.dry_run or flags.verbose)
    hooks = Hooks(
        note=lambda message: note(message, flags.quiet),
        on_plan=lambda plan: human.print(plan_table(plan)) if show_plan and human else None,
        progress=lambda what, total: byte_progress(
            what, total, not flags.quiet and not flags.json_out
        ),
        command=command_text(),
    )
    result = run_job(pre, post, method, job, hooks)
    if human is not None:
        _render(result, flags, human)
    if flags.json_out:
        emit_json(result.to_json())


def _render(result: JobResult, flags: _Flags, human: Console) -> None:
    summary = result.summary
    if "downloads" in summary:
        table = Table(title="files to download")
        for col in ("side", "file", "size", "cached"):
            table.add_column(col)
        for side, files in summary["downloads"].items():
            for f in files:
                size = f"{f['size'] / 2**20:,.1f} MiB" if f["size"] is not None else "?"
                table.add_row(side, f["file"], size, "yes" if f["cached"] else "no")
        human.print(table)
        human.print(f"dry run: nothing downloaded or written; OUT would be {flags.output}")
        return
    adapter = summary.get("input") == "peft-adapter"
    if adapter and (result.dry_run or flags.verbose):
        human.print(adapter_table(summary["adapter_plan"]["modules"]))
    if result.dry_run:
        human.print(f"dry run: nothing written; OUT would be {flags.output}")
        return
    plan = result.plan
    if flags.json_out:
        return
    if adapter:
        counts = summary["adapter_plan"]["counts"]
        what = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        kind = summary["output_kind"]
        human.print(
            f"[green]✓[/green] {kind} written ({what}; layers "
            f"{', '.join(map(str, plan.layers))}) → {result.output}",
            highlight=False,
        )
    else:
        verb = "solved" if plan.method == METHOD_PRO else "restored"
        human.print(
            f"[green]✓[/green] {verb} {len(plan.patches)} tensors in layers "
            f"{', '.join(map(str, plan.layers))} → {result.output}",
            highlight=False,
        )
    if "pushed" in summary:
        human.print(f"[green]✓[/green] pushed to {summary['pushed']}", highlight=False)
