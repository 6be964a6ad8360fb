"""``merge`` and ``pro``: parse the options once into a method and job options, run the job, render.

The work itself is :func:`qkrestore.job.run_job`; this module only turns flags into option objects
and the job's result into lines, tables and JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def merge(
    pre: PreArg,
    post: PostArg,
    output: OutputOpt,
    layers: LayersOpt = "auto",
    include_sliding: SlidingOpt = False,
    targets: TargetsOpt = "q,k",
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    link: LinkOpt = False,
    allow_arch_mismatch: ArchOpt = False,
    tensor_pattern: PatternOpt = None,
    mla_latent: MlaLatentOpt = MlaLatent.post,
    carry_missing: CarryMissingOpt = False,
    jobs: JobsOpt = 2,
    pre_weights: PreWeightsOpt = None,
    post_weights: PostWeightsOpt = None,
    expect_layers: ExpectOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    pre_id: PreIdOpt = None,
    post_id: PostIdOpt = None,
    record_paths: RecordPathsOpt = False,
    config: RecipeOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """QK-Restore: POST with the Q/K routing of its softmax-attention layers taken from PRE."""
    method = QKRestore(
        PlanOptions(
            layers=parse_layers(layers),
            include_sliding=include_sliding,
            targets=tuple(parse_targets(targets)),
            allow_arch_mismatch=allow_arch_mismatch,
            tensor_pattern=tensor_pattern,
            adapter_options=mla_latent.adapter_options(),
            carry_missing=carry_missing,
        )
    )
    _run(pre, post, method, _Flags.of(locals()))


def pro(
    pre: PreArg,
    post: PostArg,
    output: OutputOpt,
    fix: FixOpt = FixSide.key,
    ridge: RidgeOpt = 1.0,
    form: FormOpt = "ridge",
    device: SolveDeviceOpt = DeviceChoice.auto,
    layers: LayersOpt = "auto",
    include_sliding: SlidingOpt = False,
    carry_missing: CarryMissingOpt = False,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    link: LinkOpt = False,
    allow_arch_mismatch: ArchOpt = False,
    jobs: JobsOpt = 2,
    pre_weights: PreWeightsOpt = None,
    post_weights: PostWeightsOpt = None,
    expect_layers: ExpectOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    pre_id: PreIdOpt = None,
    post_id: PostIdOpt = None,
    record_paths: RecordPathsOpt = False,
    config: RecipeOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """QK-Pro: hold one routing side at PRE and solve the other per head, in closed form."""
    from ..qkpro import QKPro  # torch is imported only by the jobs that compute

    method = QKPro(
        PlanOptions(
            layers=parse_layers(layers),
            include_sliding=include_sliding,
            allow_arch_mismatch=allow_arch_mismatch,
            carry_missing=carry_missing,
        ),
        fix=fix.value,
        ridge=ridge,
        device=device.value,
        form=form,
    )
    _run(pre, post, method, _Flags.of(locals()))


@dataclass(frozen=True)
class _Flags:
    """The job and output flags that merge and pro share, read once from a command's parameters."""

    output: Path
    dry_run: bool
    expect_layers: str | None
    overwrite: bool
    link: bool
    jobs: int
    push_to_hub: str | None
    private: bool
    revision: str | None
    pre_id: str | None
    post_id: str | None
    record_paths: bool
    pre_weights: str | None
    post_weights: str | None
    json_out: bool
    quiet: bool
    verbose: bool

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> _Flags:
        """The flags among a command's parameters (the rest are the method's)."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

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
        )


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
    if result.dry_run:
        human.print(f"dry run: nothing written; OUT would be {flags.output}")
        return
    plan = result.plan
    if flags.json_out:
        return
    verb = "solved" if plan.method == METHOD_PRO else "restored"
    human.print(
        f"[green]✓[/green] {verb} {len(plan.patches)} tensors in layers "
        f"{', '.join(map(str, plan.layers))} → {result.output}",
        highlight=False,
    )
    if "pushed" in summary:
        human.print(f"[green]✓[/green] pushed to {summary['pushed']}", highlight=False)
