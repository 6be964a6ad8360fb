"""``merge`` and ``pro``: read the options once into a method and job options, run the job, render.

The work itself is :func:`qkrestore.job.run_job`; the options and the recipe are read by
:func:`qkrestore.options.resolve`, exactly as the Python API reads its keywords. This module only
declares the commands (their option parameters are built from the option model), passes on the
flags the user gave, and turns the job's result into lines, tables and JSON.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..job import Hooks, JobResult, run_job
from ..options import CommandOptions, resolve, specs
from ..surgery.plan import METHOD_PRO
from .options import (
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    PostArg,
    PreArg,
    QuietOpt,
    VerboseOpt,
    cli_value,
    option_parameters,
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
class View:
    """How the result is shown: the CLI's own flags, which the API has no use for."""

    verbose: bool
    json_out: bool
    quiet: bool


def _with_options(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give the decorated function ``command``'s parameters as typer reads them: PRE, POST, OUT,
    every option of the option model, ``--config`` and the display flags. It is called with the
    options resolved (flags given on the command line over the recipe over the defaults)."""

    def wrap(body: Callable[[str, str, CommandOptions, View], None]) -> Callable[..., None]:
        kw = inspect.Parameter.KEYWORD_ONLY
        own = [
            inspect.Parameter("ctx", kw, annotation=typer.Context),
            inspect.Parameter("pre", kw, annotation=PreArg),
            inspect.Parameter("post", kw, annotation=PostArg),
            inspect.Parameter("output", kw, annotation=OutputOpt),
        ]
        tail = [
            inspect.Parameter("config", kw, default=None, annotation=ConfigOpt),
            inspect.Parameter("verbose", kw, default=False, annotation=VerboseOpt),
            inspect.Parameter("json_out", kw, default=False, annotation=JsonOpt),
            inspect.Parameter("quiet", kw, default=False, annotation=QuietOpt),
        ]
        params = own + option_parameters(command) + tail
        keys = [s.key for s in specs(command)]

        @functools.wraps(body)
        def run(ctx: typer.Context, **kwargs: Any) -> None:
            given = {k: cli_value(kwargs[k]) for k in keys if _given(ctx, k)}
            options = resolve(command, kwargs["output"], given, recipe=kwargs["config"])
            view = View(kwargs["verbose"], kwargs["json_out"], kwargs["quiet"])
            body(kwargs["pre"], kwargs["post"], options, view)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return run

    return wrap


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through its environment
    variable), so that it overrides the recipe; a default does not."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@_with_options("merge")
def merge(pre: str, post: str, options: CommandOptions, view: View) -> None:
    """QK-Restore: POST with the Q/K routing of its softmax-attention layers taken from PRE."""
    _run(pre, post, options, view)


@_with_options("pro")
def pro(pre: str, post: str, options: CommandOptions, view: View) -> None:
    """QK-Pro: hold one routing side at PRE and solve the other per head, in closed form."""
    _run(pre, post, options, view)


def _run(pre: str, post: str, options: CommandOptions, view: View) -> None:
    human = human_console(view.json_out, view.quiet)
    job = options.job
    show_plan = human is not None and (job.dry_run or view.verbose)
    hooks = Hooks(
        note=lambda message: note(message, view.quiet),
        on_plan=lambda plan: human.print(plan_table(plan)) if show_plan and human else None,
        progress=lambda what, total: byte_progress(
            what, total, not view.quiet and not view.json_out
        ),
        command=command_text(),
    )
    result = run_job(pre, post, options.method(), job, hooks)
    if human is not None:
        _render(result, view, job.output, human)
    if view.json_out:
        emit_json(result.to_json())


def _render(result: JobResult, view: View, output: Path, human: Console) -> None:
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
        human.print(f"dry run: nothing downloaded or written; OUT would be {output}")
        return
    adapter = summary.get("input") == "peft-adapter"
    if adapter and (result.dry_run or view.verbose):
        human.print(adapter_table(summary["adapter_plan"]["modules"]))
    if result.dry_run:
        human.print(f"dry run: nothing written; OUT would be {output}")
        return
    plan = result.plan
    if view.json_out:
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
