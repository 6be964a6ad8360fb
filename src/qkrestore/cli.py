"""The ``qkrestore`` command line: a thin shell that parses, calls, and renders.

Errors of the tool's own type become one line on stderr and a meaningful exit code; a traceback is
shown only with ``--debug``. ``--json`` puts exactly one JSON document on stdout; everything meant for
humans goes to stderr in that mode.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_common import STATE, emit_json, err_console, note, open_checkpoint, out_console
from .cli_diagnostics import register as register_diagnostics
from .cli_jobs import JobFlags, parse_expect, run_job
from .cli_options import (
    ArchOpt,
    DeviceChoice,
    DryRunOpt,
    ExpectOpt,
    FixSide,
    ForwardMode,
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
    PreArg,
    PrivateOpt,
    PushOpt,
    QuietOpt,
    RecipeOpt,
    RevisionOpt,
    SlidingOpt,
    TargetsOpt,
    VerboseOpt,
)
from .cli_sweep import register as register_sweep
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    QKRestoreError,
)
from .hub import (
    push_folder,
)
from .inspect import compare, describe
from .merge import MergeOptions, plan_merge
from .plan import parse_layers, parse_targets
from .verify import read_provenance, verify_output

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
    STATE["debug"] = debug or bool(os.environ.get("QKRESTORE_DEBUG"))


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
    run_job(pre, post, job, opts, lambda a, b: plan_merge(a, b, opts))


PRO_EPILOG = (
    """[bold]Examples[/bold]

  qkrestore pro ./base ./sft -o ./sft-qkpro                     # --fix key --ridge 1.0
  qkrestore pro ./base ./sft -o ./out --fix query --ridge 0.1 --device cuda
  qkrestore pro ./base ./sft -o ./out --ridge 0 --dry-run        # ridge 0 is QK-Restore
  qkrestore pro ./base ./sft -o ./out --form cross-gram          # exact cross-Gram, no ridge

"""
    + EXIT_CODES_HELP
)


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
    form: Annotated[
        str,
        typer.Option(
            "--form",
            help="'ridge' (default): the ridge-relaxed bilinear form; 'cross-gram': keep PRE's "
            "d_h×d_h cross-Gram Q_h K_gᵀ exactly, with the smallest change (ignores --ridge).",
        ),
    ] = "ridge",
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

    run_job(
        pre,
        post,
        job,
        opts,
        lambda a, b: plan_pro(a, b, opts, fix.value, ridge, device.value, form),
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
    with open_checkpoint(model, "MODEL") as ck:
        desc = describe(ck)
        if compare_with is not None:
            with open_checkpoint(compare_with, "OTHER") as other:
                desc["compare"] = {
                    "other": str(compare_with),
                    "layers": compare(ck, other, desc),
                }
    if json_out:
        emit_json(desc)
        return
    c = out_console
    c.print(
        f"[bold]{desc['path']}[/bold]\n"
        f"model_type: {desc['model_type']}   adapter: {desc['adapter']} ({desc['adapter_reason']})\n"
        f"layers: {desc['num_layers']}   global softmax: {desc['global_layers']}   "
        f"local softmax: {desc['local_layers']}",
        highlight=False,
    )
    if desc["adapter_description"]:
        c.print(f"family: {escape(desc['adapter_description'])}", highlight=False)
    for n in desc["adapter_notes"]:
        note(n)
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
        out,
        repo_id,
        private=private,
        revision=revision,
        message=f"{method} with qkrestore",
    )
    if json_out:
        emit_json({"ok": True, "repo_id": repo_id, "revision": revision, "url": url})
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
            "--workdir",
            help="Where to write the demo models (default: a new temp folder).",
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
    emit_json(
        {
            "ok": True,
            "workdir": str(root),
            "pre": str(root / "pre"),
            "post": str(root / "post"),
            "output": str(root / "post-qkrestore"),
        }
    )


register_diagnostics(app)
register_sweep(app)


# -- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every failure into a one-line message and an exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        STATE["argv"] = list(sys.argv[1:] if argv is None else argv)
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except QKRestoreError as exc:
        if STATE["debug"]:
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
        if STATE["debug"]:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err_console.print(
            f"[red]error:[/red] {where}{exc.strerror or exc}",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_USAGE
    except Exception as exc:
        if STATE["debug"]:
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
