"""The ``qkrestore`` command line: a thin shell that parses, calls, and renders.

Errors of the tool's own type become one line on stderr and a meaningful exit code; a traceback is
shown only with ``--debug``. ``--json`` puts exactly one JSON document on stdout; everything meant for
humans goes to stderr in that mode.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .checkpoint import Checkpoint
from .cli_diagnostics import register as register_diagnostics
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    OutputError,
    PlanError,
    QKRestoreError,
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
from .inspect import compare, describe
from .merge import MergeOptions, execute, plan_merge
from .plan import METHOD_PRO, RestorePlan, parse_layers, parse_targets, pre_names_for
from .recipes import load_recipe
from .verify import read_provenance, verify_output
from .writer import WriteResult, check_output_location

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 verification failed; 2 usage or input error; 3 internal error; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)

app = typer.Typer(
    name="qkrestore",
    help="Checkpoint surgery for hybrid LLMs: bring back long-range recall after CoT fine-tuning "
    "by restoring the query/key routing of softmax-attention layers from the pre-SFT checkpoint.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

out_console = Console()
err_console = Console(stderr=True)
_state: dict[str, Any] = {"debug": False, "argv": []}


def _command() -> str:
    """The command as the user typed it, for the model card and the provenance record."""
    return shlex.join(["qkrestore", *_state["argv"]])


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup (temporary folders) runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _version(value: bool) -> None:
    if value:
        print(f"qkrestore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    _state["debug"] = debug or bool(os.environ.get("QKRESTORE_DEBUG"))


# -- helpers --------------------------------------------------------------------------------------


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _human(json_mode: bool, quiet: bool = False) -> Console | None:
    """Where human-readable output goes: stdout normally, stderr under --json, nowhere under --quiet."""
    if quiet:
        return None
    return err_console if json_mode else out_console


def _note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(f"[yellow]note:[/yellow] {msg}", highlight=False, soft_wrap=True)


def _open(path: Path, label: str, partial: bool = False) -> Checkpoint:
    try:
        return Checkpoint.open(path, partial=partial)
    except QKRestoreError as exc:
        exc.message = f"{label}: {exc.message}"
        raise


class ByteProgress:
    """A byte progress bar with throughput, shown only once a run has taken more than a second.

    Short runs print nothing extra; ``advance`` is safe to call from the writer's threads.
    """

    DELAY_S = 1.0

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self.task = self.bar.add_task(description, total=total)
        self.started_at = time.monotonic()
        self.shown = False
        self.lock = threading.Lock()

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)
        if self.enabled and not self.shown and time.monotonic() - self.started_at > self.DELAY_S:
            with self.lock:
                if not self.shown:
                    self.shown = True
                    self.bar.start()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self.bar.stop()


def _plan_table(plan: RestorePlan, post: Checkpoint) -> Table:
    table = Table(title=f"{plan.method}: {len(plan.patches)} tensors in layers {plan.layers}")
    for col in ("layer", "kind", "tensor", "rows", "dtype", "file", "from"):
        table.add_column(col, overflow="fold", no_wrap=col == "tensor")
    for p in plan.patches:
        rows = ", ".join(f"{a}:{b}" for a, b in p.rows[:4]) + (" …" if len(p.rows) > 4 else "")
        dtype = p.dtype if not p.cast else f"{p.pre_dtype}→{p.dtype}"
        table.add_row(
            str(p.layer), plan.layer_kinds[p.layer], p.name, rows, dtype, p.file, p.source
        )
    return table


class MlaLatent(str, Enum):
    post = "post"
    pre = "pre"


def _recipe_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """Load a recipe as defaults for this command; options given on the command line still win."""
    if value is not None:
        params = [(p.name, getattr(p, "opts", [])) for p in ctx.command.params]
        ctx.default_map = {**(ctx.default_map or {}), **load_recipe(value, params)}
    return value


PreArg = Annotated[
    str,
    typer.Argument(
        help="Pre-SFT checkpoint (routing source): a folder, org/name[@rev] or hf://org/name."
    ),
]
PostArg = Annotated[
    str,
    typer.Argument(
        help="Post-SFT checkpoint (everything else): a folder, org/name[@rev] or hf://…."
    ),
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to create.")]
ExpectOpt = Annotated[
    str | None,
    typer.Option(
        "--expect-layers",
        help="Refuse to run unless the planned layers are exactly these (recipes use it as a check).",
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option("--push-to-hub", help="After success, upload OUT to this Hub repo id."),
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub branch to push to (created if needed).")
]
RecipeOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A YAML recipe holding any of these options (see configs/); command-line options win.",
        is_eager=True,
        callback=_recipe_callback,
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print the plan table.")]


LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        help="'auto' (every global softmax-attention layer) or 0-based indices, e.g. 3,7,11 or 3-7.",
    ),
]
SlidingOpt = Annotated[
    bool,
    typer.Option(
        "--include-sliding", help="With --layers auto, also restore local (sliding) layers."
    ),
]
TargetsOpt = Annotated[
    str,
    typer.Option(
        "--targets", help="Projections to restore: comma list of q,k,v,o (v/o are ablations)."
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace OUT if it exists (only once the new one is complete)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")]
ArchOpt = Annotated[
    bool,
    typer.Option(
        "--allow-arch-mismatch",
        help="Plan from POST's config even if PRE's names another family or layer map.",
    ),
]
PatternOpt = Annotated[
    str | None,
    typer.Option(
        "--tensor-pattern",
        help="For families qkrestore does not know: a regular expression for the tensors to "
        "restore whole, with {i} standing for the layer index; needs explicit --layers.",
    ),
]
MlaLatentOpt = Annotated[
    MlaLatent,
    typer.Option(
        "--mla-latent",
        help="MLA layers (Kimi Linear): also take the latent rows of kv_a_proj_with_mqa and "
        "kv_a_layernorm, which V shares, from PRE ('pre'), or keep POST's ('post', default).",
    ),
]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Files copied in parallel.")]
LinkOpt = Annotated[
    bool,
    typer.Option(
        "--link",
        help="Hard-link untouched shards instead of copying (they then share storage with POST).",
    ),
]


# -- commands -------------------------------------------------------------------------------------

MERGE_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore merge ./base ./sft -o ./sft-qkrestore
  qkrestore merge ./base ./sft -o ./out --layers 3,7,11 --dry-run
  qkrestore merge ./base ./sft -o ./out --targets q,k,v --overwrite --json

"""
    + EXIT_CODES_HELP
)


@app.command(epilog=MERGE_EPILOG)
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
    jobs: JobsOpt = 2,
    expect_layers: ExpectOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    config: RecipeOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """QK-Restore: POST with the Q/K routing of its softmax-attention layers taken from PRE."""
    opts = MergeOptions(
        layers=parse_layers(layers),
        include_sliding=include_sliding,
        targets=tuple(parse_targets(targets)),
        overwrite=overwrite,
        link=link,
        allow_arch_mismatch=allow_arch_mismatch,
        tensor_pattern=tensor_pattern,
        jobs=jobs,
        adapter_options={"mla_latent": mla_latent.value} if mla_latent is MlaLatent.pre else {},
    )
    job = JobFlags(
        output,
        dry_run,
        json_out,
        quiet,
        verbose,
        parse_expect(expect_layers),
        push_to_hub,
        private,
        revision,
    )
    _run_job(pre, post, job, opts, lambda a, b: plan_merge(a, b, opts))


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
    meta: Path, post_ck: Checkpoint, make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan]
) -> list[str]:
    """Names of the tensors PRE must supply, known from PRE's index before its shards are fetched."""
    index = json.loads((meta / "model.safetensors.index.json").read_text(encoding="utf-8"))
    return pre_names_for(make_plan(post_ck, post_ck), post_ck, index.get("weight_map", {}))


def _run_job(
    pre: str,
    post: str,
    job: JobFlags,
    opts: MergeOptions,
    make_plan: Callable[[Checkpoint, Checkpoint], RestorePlan],
) -> None:
    """Shared by merge and pro: resolve sources, plan, print or write, push, summarise."""
    human = _human(job.json_out, job.quiet)
    pre_src, post_src = parse_source(pre), parse_source(post)
    output = job.output
    if job.dry_run and (pre_src.is_hub or post_src.is_hub):
        _hub_dry_run(pre_src, post_src, job, make_plan)
        return
    with _open(fetch_post(post_src), "POST") as post_ck:
        pre_root = fetch_pre(pre_src, lambda meta: _needed_pre_names(meta, post_ck, make_plan))
        with _open(pre_root, "PRE", partial=pre_src.is_hub) as pre_ck:
            # Output problems are the cheapest to find: report them before any planning.
            check_output_location(output.absolute(), {"PRE": pre_ck.root, "POST": post_ck.root})
            if not job.dry_run and output.exists() and not opts.overwrite:
                raise OutputError(
                    f"{output}: already exists", hint="pass --overwrite to replace it"
                )
            if pre_ck.root.resolve() == post_ck.root.resolve():
                _note("PRE and POST are the same folder: the output will equal POST", job.quiet)
            plan = make_plan(pre_ck, post_ck)
            if job.expect_layers is not None and plan.layers != job.expect_layers:
                raise PlanError(
                    f"expected softmax-attention layers {job.expect_layers}, but the plan has "
                    f"{plan.layers}",
                    hint="is this the model the recipe was written for?",
                )
            for n in plan.notes:
                _note(n, job.quiet)
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
                human.print(_plan_table(plan, post_ck))
            if job.dry_run:
                if human:
                    human.print(f"dry run: nothing written; OUT would be {output}")
                if job.json_out:
                    _emit_json(summary)
                return
            result = _write(plan, pre_ck, post_ck, output, opts, job, pre_src, post_src, summary)
    for skipped in result.skipped:
        _note(f"not copied from POST (another weight format): {skipped}", job.quiet)
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
        _emit_json(summary)
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
    plan = make_plan(pre_ck, post_ck)
    if job.expect_layers is not None and plan.layers != job.expect_layers:
        raise PlanError(
            f"expected softmax-attention layers {job.expect_layers}, but the plan has {plan.layers}"
        )
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
    human = _human(job.json_out, job.quiet)
    if human:
        human.print(_plan_table(plan, post_ck))
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
        _emit_json(summary)


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
            _note(
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
                command=_command(),
            )
    finally:
        if store is not None:
            store.close()


PRO_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore pro ./base ./sft -o ./sft-qkpro                     # --fix key --ridge 1.0
  qkrestore pro ./base ./sft -o ./out --fix query --ridge 0.1 --device cuda
  qkrestore pro ./base ./sft -o ./out --ridge 0 --dry-run        # ridge 0 is QK-Restore

"""
    + EXIT_CODES_HELP
)


class FixSide(str, Enum):
    key = "key"
    query = "query"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command(epilog=PRO_EPILOG)
def pro(
    pre: PreArg,
    post: PostArg,
    output: OutputOpt,
    fix: Annotated[
        FixSide,
        typer.Option("--fix", help="Side held at PRE: 'key' solves W_Q, 'query' solves W_K."),
    ] = FixSide.key,
    ridge: Annotated[
        float,
        typer.Option(
            "--ridge",
            min=0.0,
            help="Relaxation R ≥ 0 (λ = R·trace(G)/d_h): 0 gives QK-Restore, large R gives POST.",
        ),
    ] = 1.0,
    device: Annotated[
        DeviceChoice,
        typer.Option("--device", help="Where to solve: auto (CUDA if present), cpu, cuda."),
    ] = DeviceChoice.auto,
    layers: LayersOpt = "auto",
    include_sliding: SlidingOpt = False,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteOpt = False,
    link: LinkOpt = False,
    allow_arch_mismatch: ArchOpt = False,
    jobs: JobsOpt = 2,
    expect_layers: ExpectOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    config: RecipeOpt = None,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """QK-Pro: hold one routing side at PRE and solve the other per head, in closed form."""
    opts = MergeOptions(
        layers=parse_layers(layers),
        include_sliding=include_sliding,
        targets=("q", "k"),
        overwrite=overwrite,
        link=link,
        allow_arch_mismatch=allow_arch_mismatch,
        jobs=jobs,
    )
    job = JobFlags(
        output,
        dry_run,
        json_out,
        quiet,
        verbose,
        parse_expect(expect_layers),
        push_to_hub,
        private,
        revision,
    )
    from .pro import plan_pro  # torch is imported only by the jobs that compute

    _run_job(
        pre, post, job, opts, lambda a, b: plan_pro(a, b, opts, fix.value, ridge, device.value)
    )


INSPECT_EPILOG = """[bold]Examples[/bold]

  qkrestore inspect-layers ./sft
  qkrestore inspect-layers ./base --compare ./sft
  qkrestore inspect-layers ./sft --json
"""


@app.command("inspect-layers", epilog=INSPECT_EPILOG)
def inspect_layers(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    compare_with: Annotated[
        Path | None,
        typer.Option("--compare", help="Another checkpoint: report Q/K drift ‖ΔW‖/‖W‖ per layer."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show which layers are softmax attention and where their Q/K tensors are."""
    with _open(model, "MODEL") as ck:
        desc = describe(ck)
        if compare_with is not None:
            with _open(compare_with, "OTHER") as other:
                desc["compare"] = {"other": str(compare_with), "layers": compare(ck, other, desc)}
    if json_out:
        _emit_json(desc)
        return
    c = out_console
    c.print(
        f"[bold]{desc['path']}[/bold]\n"
        f"model_type: {desc['model_type']}   adapter: {desc['adapter']} ({desc['adapter_reason']})\n"
        f"layers: {desc['num_layers']}   global softmax: {desc['global_layers']}   "
        f"local softmax: {desc['local_layers']}",
        highlight=False,
    )
    table = Table(title=f"routing tensors (names under {desc['layer_prefix']}<layer>.)")
    for col in ("layer", "kind", "tensor", "rows", "shape", "dtype", "shard"):
        table.add_column(col, overflow="fold", no_wrap=col == "tensor")
    for layer in desc["layers"]:
        for t in layer["tensors"]:
            rows = t["rows"]
            rtext = ", ".join(f"{a}:{b}" for a, b in rows[:4]) + (" …" if len(rows) > 4 else "")
            short = t["name"].removeprefix(f"{desc['layer_prefix']}{layer['layer']}.")
            table.add_row(
                str(layer["layer"]),
                layer["kind"],
                short,
                rtext,
                str(t["shape"]),
                t["dtype"],
                t["file"],
            )
    c.print(table)
    if "compare" in desc:
        c.print(f"compared with: {desc['compare']['other']}", highlight=False)
        drift = Table(title="Q/K drift ‖ΔW‖/‖W‖")
        for col in ("layer", "kind", "q", "k"):
            drift.add_column(col)
        for row in desc["compare"]["layers"]:
            drift.add_row(
                str(row["layer"]),
                row["kind"],
                *(f"{row[t]:.4g}" if t in row else "-" for t in ("q", "k")),
            )
        c.print(drift)


class ForwardMode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


VERIFY_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore verify ./sft-qkrestore
  qkrestore verify ./sft-qkrestore --pre ./moved/base --post ./moved/sft --json

"""
    + EXIT_CODES_HELP
)


@app.command(epilog=VERIFY_EPILOG)
def verify(
    out: Annotated[Path, typer.Argument(help="An output folder written by merge or pro.")],
    pre: Annotated[Path | None, typer.Option("--pre", help="Override PRE's recorded path.")] = None,
    post: Annotated[
        Path | None, typer.Option("--post", help="Override POST's recorded path.")
    ] = None,
    forward: Annotated[
        ForwardMode,
        typer.Option(
            "--forward",
            help="Load OUT in transformers and run one forward pass: auto (models ≤ 2 GiB), "
            "always, never.",
        ),
    ] = ForwardMode.auto,
    json_out: JsonOpt = False,
) -> None:
    """Check every byte of OUT against its recorded plan, PRE and POST."""
    report = verify_output(out, pre, post, forward.value)
    if json_out:
        _emit_json(report.to_json())
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
                f"error: verification failed{': ' + str(first) if first else ''}", highlight=False
            )
        raise typer.Exit(EXIT_VERIFY_FAILED)


PUSH_EPILOG = """[bold]Examples[/bold]

  qkrestore push ./sft-qkrestore my-org/sft-qkrestore
  qkrestore push ./sft-qkrestore my-org/sft-qkrestore --private --revision experiment
"""


@app.command(epilog=PUSH_EPILOG)
def push(
    out: Annotated[Path, typer.Argument(help="An output folder written by merge or pro.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id to create or update, e.g. org/name.")],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload an output made earlier to the Hugging Face Hub (uses your saved Hub token)."""
    record = read_provenance(out)
    method = record.get("plan", {}).get("method", "qk-restore")
    url = push_folder(
        out, repo_id, private=private, revision=revision, message=f"{method} with qkrestore"
    )
    if json_out:
        _emit_json({"ok": True, "repo_id": repo_id, "revision": revision, "url": url})
    else:
        out_console.print(f"[green]✓[/green] pushed {out} → {url}", highlight=False)


DEMO_EPILOG = """[bold]Examples[/bold]

  qkrestore demo
  qkrestore demo --workdir ./qkrestore-demo
"""


@app.command(epilog=DEMO_EPILOG)
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", help="Where to write the demo models (default: a new temp folder)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build a tiny Qwen3-Next-style hybrid pair offline, then inspect, merge and verify it."""
    import contextlib

    from .demo import run_demo

    if not json_out:
        run_demo(workdir, out_console)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the steps' own output is for humans
        root = run_demo(workdir, err_console)
    _emit_json(
        {
            "ok": True,
            "workdir": str(root),
            "pre": str(root / "pre"),
            "post": str(root / "post"),
            "output": str(root / "post-qkrestore"),
        }
    )


register_diagnostics(app, out_console, err_console)


# -- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every failure into a one-line message and an exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _state["argv"] = list(sys.argv[1:] if argv is None else argv)
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except QKRestoreError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, ...
        exc.show()
        return EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted: no partial output was left behind", highlight=False)
        return EXIT_INTERRUPTED
    except Terminated:
        err_console.print("terminated: no partial output was left behind", highlight=False)
        return EXIT_TERMINATED
    except OSError as exc:
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err_console.print(
            f"[red]error:[/red] {where}{exc.strerror or exc}", highlight=False, soft_wrap=True
        )
        return EXIT_USAGE
    except Exception as exc:
        if _state["debug"]:
            raise
        err_console.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)
