"""The diagnostic commands (drift, attn-distance, autocorr, niah).

Parse, call :mod:`qkrestore.diagnostics`, render. ``--json``
puts one JSON document on stdout and sends everything for humans to stderr; ``--plot FILE.png`` is
checked (matplotlib present, folder exists) before any work starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .options import (
    BeyondOpt,
    DeviceChoice,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    InputKind,
    JsonOpt,
    PlotOpt,
    RemoteOpt,
    Scoring,
    ScoringOpt,
    SeedOpt,
    Task,
)
from .output import emit_json, err_console, note, out_console


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _human(json_mode: bool) -> Console:
    return err_console if json_mode else out_console


def _finish(report: dict[str, Any], json_out: bool) -> Console:
    """Print the JSON document under ``--json``; the console for the human rendering that follows."""
    if json_out:
        emit_json(report)
    return _human(json_out)


DRIFT_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore drift ./base ./sft\n"
    "  qkrestore drift ./base ./sft --plot drift.png --json > drift.json\n"
)


def drift(
    pre: Annotated[Path, typer.Argument(help="Pre-SFT checkpoint folder.")],
    post: Annotated[Path, typer.Argument(help="Post-SFT checkpoint folder.")],
    all_layers: Annotated[
        bool,
        typer.Option(
            "--all-layers", help="Also compare non-softmax layers that have q/k projections."
        ),
    ] = False,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Weight drift PRE → POST: Q/K/V/O per head, routing form Q_hᵀK_g, key-subspace angles.

    Reads weights only (no model run), one KV group at a time, in float64.
    """
    from ..api_eval import drift as run

    report = run(pre, post, all_layers=all_layers, plot=plot).to_json()
    for n in report["notes"]:
        note(n)
    c = _finish(report, json_out)
    table = Table(
        title="drift PRE → POST: ‖ΔW‖/‖W‖; route = ‖Δ(Q_hᵀK_g)‖/‖Q_hᵀK_g‖ (mean, max over "
        "heads); K∠ = largest principal angle between the key row spaces"
    )
    for col in ("layer", "kind", "Q", "K", "V", "O", "route", "route max", "K∠°"):
        table.add_column(col, justify="right" if col not in ("kind",) else "left")
    for x in report["layers"]:
        r = x["routing_drift"] or {}
        ang = (x.get("k_subspace") or {}).get("layer") or {}
        table.add_row(
            str(x["layer"]),
            x["kind"],
            *(_fmt(x[t]["rel_drift"], ".3g") if t in x else "-" for t in "qkvo"),
            _fmt(r.get("mean"), ".3g"),
            _fmt(r.get("max"), ".3g"),
            _fmt(ang.get("max_deg"), ".3g"),
        )
    c.print(table)
    if report["ranking"]:
        top = ", ".join(f"{r['layer']} ({r['routing_drift']:.3g})" for r in report["ranking"][:5])
        c.print(f"most routing drift: {top}", highlight=False)
    if plot is not None:
        c.print(f"figure: {plot}", highlight=False)


# -- attn-distance ----------------------------------------------------------------------------

ATTN_DISTANCE_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore attn-distance ./base ./sft ./sft-qkrestore --length 8192 --depth 0.5\n"
    "  qkrestore attn-distance ./base ./sft ./sft-qkrestore --plot fig4.png --layer 33 "
    "--head 8\n"
)


def attn_distance(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="Model folders, e.g. PRE POST RESTORED (compared in this order).",
        ),
    ],
    length: Annotated[
        int, typer.Option("--length", min=32, help="Prompt length in tokens.")
    ] = 8192,
    depth: Annotated[
        float,
        typer.Option("--depth", min=0.0, max=1.0, help="Where the needle sits (0 = start)."),
    ] = 0.5,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = DType.auto,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Layer drawn by --plot (default: picked).")
    ] = None,
    head: Annotated[
        int | None, typer.Option("--head", help="Head drawn by --plot (default: picked).")
    ] = None,
    seed: SeedOpt = 0,
    trust_remote_code: RemoteOpt = False,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Mean attention distance D_h (Eq. 17) per head on a synthetic needle prompt.

    Runs each model with eager attention and counts, per softmax layer, the heads whose D_h fell
    from one model to the next; --plot draws the four-panel attention-map figure (PRE, POST,
    restored, log-ratio restored/POST) for one head.
    """
    from ..api_eval import attn_distance as run

    report = run(
        *models,
        length=length,
        depth=depth,
        device=device.value,
        dtype=dtype.value,
        layer=layer,
        head=head,
        seed=seed,
        trust_remote_code=trust_remote_code,
        plot=plot,
        on_note=note,
        on_model=lambda line: err_console.print(line, highlight=False),
    ).to_json()
    c = _finish(report, json_out)
    table = Table(title=f"mean attention distance D_h (tokens), {length}-token needle prompt")
    table.add_column("layer", justify="right")
    table.add_column("kind")
    for i, m in enumerate(models):
        table.add_column(f"[{i}] {Path(m).name}", justify="right")
    for k, cmp in enumerate(report["comparisons"]):
        word = "fell" if k == 0 else "rose"
        table.add_column(f"{word} {cmp['from']}→{cmp['to']}", justify="right")
    by_layer = (
        {row["layer"]: row for row in report["comparisons"][0]["layers"]}
        if report["comparisons"]
        else {}
    )
    for row in report["models"][0]["layers"]:
        i = row["layer"]
        means = []
        for mdl in report["models"]:
            hit = next((x for x in mdl["layers"] if x["layer"] == i), None)
            means.append(_fmt(hit["mean"], ".1f") if hit else "-")
        fells = []
        for k, cmp in enumerate(report["comparisons"]):
            r = next((x for x in cmp["layers"] if x["layer"] == i), None)
            count = r["fell" if k == 0 else "rose"] if r else None
            fells.append(f"{count}/{r['heads']}" if r else "-")
        table.add_row(str(i), row["kind"], *means, *fells)
    c.print(table)
    if by_layer:
        first = report["comparisons"][0]["ranking"][0]
        r = by_layer[first]
        c.print(
            f"most affected layer: {first} ({r['fell']} of {r['heads']} heads fell 0→1)",
            highlight=False,
        )
    if "plot" in report:
        p = report["plot"]
        c.print(f"figure: {p['file']} (layer {p['layer']}, head {p['head']})", highlight=False)


# -- autocorr ---------------------------------------------------------------------------------

AUTOCORR_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore autocorr cot.jsonl --tokenizer ./base --max-distance 256\n"
    "  qkrestore autocorr tokens.npy --plot rho.png --json\n"
)


def autocorr(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help=".txt (text or whitespace-separated ids), .jsonl ('text' or 'input_ids') or "
            ".npy (ids; 2-D = one document per row).",
        ),
    ],
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="Local tokenizer (model) folder, for text input."),
    ] = None,
    max_distance: Annotated[
        int, typer.Option("--max-distance", min=2, help="Largest lag d.")
    ] = 128,
    input_kind: Annotated[
        InputKind,
        typer.Option(
            "--input-kind", help="auto (by suffix and content), ids or text, for .txt/.jsonl."
        ),
    ] = InputKind.auto,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Token autocorrelation ρ(d) of a corpus and its exponential decay length τ."""
    from ..api_eval import autocorr as run

    report = run(
        input_path,
        tokenizer=tokenizer,
        max_distance=max_distance,
        input_kind=input_kind.value,
        plot=plot,
    ).to_json()
    c = _finish(report, json_out)
    c.print(
        f"{report['tokens']:,} tokens in {report['documents']:,} documents, "
        f"{report['vocab_seen']:,} token types",
        highlight=False,
    )
    rho = report["rho"]
    shown = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if d <= len(rho)]
    c.print(
        "ρ(d): " + "  ".join(f"d={d}: {_fmt(rho[d - 1], '.3g')}" for d in shown),
        highlight=False,
    )
    for n in report["notes"]:
        note(n)
    if report["fit_distances"]:
        a, b = report["fit_distances"]
        tau = "∞" if report["tau"] is None else f"{report['tau']:.4g}"
        c.print(
            f"fit ρ(d) ≈ A·exp(−d/τ) on d = {a}..{b}: A = {report['A']:.4g}, τ = {tau} "
            f"tokens (weighted R² {report['r2']:.3f})",
            highlight=False,
        )
    if plot is not None:
        c.print(f"figure: {plot}", highlight=False)


# -- niah -------------------------------------------------------------------------------------

NIAH_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore niah ./sft-qkrestore --lengths 4096,8192 --task single-2 --samples 20\n"
    "  qkrestore niah ./sft --task single-3 --device cuda --json\n\n"
    "For official numbers use lm-evaluation-harness's RULER tasks (niah_single_1/2/3)."
)


def niah(
    model: Annotated[Path, typer.Argument(help="Model folder, with its tokenizer files.")],
    lengths: Annotated[
        str, typer.Option("--lengths", help="Comma list of prompt lengths in tokens.")
    ] = "4096,8192",
    task: Annotated[Task, typer.Option("--task", help="RULER-style task.")] = Task.single_2,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Prompts per length.")] = 10,
    depth: Annotated[
        float | None,
        typer.Option(
            "--depth", min=0.0, max=1.0, help="Fixed needle depth (default: spread over 0..1)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Default 24 (numbers) or 48 (UUIDs)."),
    ] = None,
    chat_template: Annotated[
        bool,
        typer.Option("--chat-template", help="Wrap the question in the tokenizer's template."),
    ] = False,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = DType.auto,
    seed: SeedOpt = 0,
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    scoring: ScoringOpt = Scoring.forced,
    beyond_context: BeyondOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """A RULER-style needle-in-a-haystack probe: exact-match accuracy per prompt length."""
    from ..api_eval import niah as run

    report = run(
        model,
        lengths=lengths,
        task=task.value,
        samples=samples,
        depth=depth,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        device=device.value,
        dtype=dtype.value,
        seed=seed,
        trust_remote_code=trust_remote_code,
        scoring=scoring.value,
        beyond_context=beyond_context,
        device_map=device_map.value if device_map else None,
    ).to_json()
    for n in report["notes"]:
        note(n)
    c = _finish(report, json_out)
    table = Table(title=f"NIAH {task.value} on {model} ({report['device']}, {report['dtype']})")
    for col in ("length", "accuracy", "correct", "seconds"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            str(r["length"]),
            f"{100 * r['accuracy']:.1f} %",
            f"{r['correct']}/{r['samples']}",
            f"{r['seconds']:.1f}",
        )
    c.print(table)
    c.print(
        f"[dim]seconds: scoring each length; building the {len(report['samples'])} prompts took "
        f"{report['prompts_seconds']:.1f} s before it[/dim]",
        highlight=False,
    )
    c.print(f"[dim]{report['reference']}[/dim]", highlight=False)
