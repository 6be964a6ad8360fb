"""The ``merge`` job end to end: open both sides, plan, write, record. No printing here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import command_line, write_card_and_provenance
from .checkpoint import Checkpoint
from .plan import RestorePlan, build_plan
from .writer import WriteResult, write_output


@dataclass
class MergeOptions:
    layers: list[int] | None = None
    include_sliding: bool = False
    targets: tuple[str, ...] = ("q", "k")
    overwrite: bool = False
    link: bool = False
    allow_arch_mismatch: bool = False
    tensor_pattern: str | None = None
    jobs: int = 2
    adapter_options: dict[str, Any] = field(default_factory=dict)


def plan_merge(pre: Checkpoint, post: Checkpoint, opts: MergeOptions) -> RestorePlan:
    return build_plan(
        pre,
        post,
        layers=opts.layers,
        include_sliding=opts.include_sliding,
        targets=opts.targets,
        allow_arch_mismatch=opts.allow_arch_mismatch,
        options=opts.adapter_options,
        tensor_pattern=opts.tensor_pattern,
    )


def execute(
    plan: RestorePlan,
    pre: Checkpoint,
    post: Checkpoint,
    out: Path,
    opts: MergeOptions,
    *,
    pre_source: str,
    post_source: str,
    computed: Mapping[str, bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    command: str | None = None,
) -> WriteResult:
    """Write OUT for ``plan`` with its model card and provenance (shared by merge and pro)."""
    cmd = command or command_line()

    def finalize(folder: Path, result: WriteResult) -> None:
        write_card_and_provenance(
            folder,
            plan,
            result,
            pre_source=pre_source,
            post_source=post_source,
            pre_root=pre.root,
            post_root=post.root,
            command=cmd,
        )

    return write_output(
        plan,
        pre,
        post,
        out,
        overwrite=opts.overwrite,
        link=opts.link,
        computed=computed,
        finalize=finalize,
        progress=progress,
        jobs=opts.jobs,
    )
