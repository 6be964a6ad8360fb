"""The ``sweep`` and ``select-layers`` commands.

A thin shell: parse, call :func:`qkrestore.sweep` / :func:`qkrestore.select_layers` (the Python
API, which checks every option before a model is loaded), render. ``--json`` puts one JSON document
on stdout; progress and notes go to stderr: a bar on a terminal, one plain line per candidate
elsewhere. Ctrl-C or SIGTERM shows the candidates measured so far (kept in ``--json-out``).
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table

from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from ..evaluate.runlog import Progress, Step
from .options import (
    ArchOpt,
    BeyondOpt,
    DeviceChoice,
    DeviceMapOpt,
    DeviceOpt,
    JsonOpt,
    LayersOpt,
    QuietOpt,
    RecipeOpt,
    RemoteOpt,
    Scoring,
    ScoringOpt,
    SeedOpt,
    SlidingOpt,
)
from .options import Task as NiahTask
from .output import command_text, emit_json, err_console, fit_columns, note, out_console


class SweepDType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ReasoningMetric(str, Enum):
    exact = "exact"
    loglik = "loglik"


LengthsOpt = Annotated[
    str,
    typer.Option("--lengths", help="NIAH prompt lengths in tokens (comma list)."),
]
TaskOpt = Annotated[NiahTask, typer.Option("--task", help="NIAH task (RULER-style).")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=1, help="NIAH prompts per length.")]
RecallOpt = Annotated[
    Path | None,
    typer.Option(
        "--recall",
        help="Measure recall on this JSONL of {prompt, answer[, group]} (greedy exact match per "
        "group) instead of the built-in NIAH probe; prompts may be token-id lists.",
    ),
]
LmEvalOpt = Annotated[
    str | None,
    typer.Option(
        "--lm-eval",
        help="Comma list of lm-evaluation-harness tasks to run on every candidate (needs the "
        "'eval' extra), e.g. niah_single_1; without --recall they replace the NIAH probe.",
    ),
]
LmEvalMaxLenOpt = Annotated[
    int | None,
    typer.Option("--lm-eval-max-length", min=1, help="HFLM max_length (default: the model's)."),
]
LmEvalLimitOpt = Annotated[
    float | None,
    typer.Option("--lm-eval-limit", help="Examples per task (a number, or a fraction < 1)."),
]
LmEvalIncludeOpt = Annotated[
    Path | None,
    typer.Option("--lm-eval-include", help="A folder of your own lm-eval task YAML files."),
]
LmEvalMetricOpt = Annotated[
    str | None,
    typer.Option(
        "--lm-eval-metric",
        help="Score each task by this metric only (e.g. acc); default: all its numeric metrics.",
    ),
]
DTypeOpt = Annotated[
    SweepDType,
    typer.Option(
        "--dtype",
        help="Weights' dtype in memory: auto = float32 on the CPU, bfloat16 on CUDA (as for "
        "every command that runs a model).",
    ),
]
AutocastOpt = Annotated[
    bool,
    typer.Option("--autocast/--no-autocast", help="bf16 autocast of the forward pass on CUDA."),
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        help="Recall/reasoning items scored per forward pass (padded on the right; at most "
        "2^28 logits, 1 GiB in float32, a batch; longer items run alone).",
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot", help="Draw recall vs reasoning with the Pareto front (PNG; 'plot' extra)."
    ),
]
JsonOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--json-out",
        help="Write the results to FILE after every candidate (the --json document; complete "
        "is false until the end).",
    ),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help="Skip the candidates FILE holds (written by --json-out with the same settings) "
        "and keep writing to it.",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Write the recipe even when the probe cannot decide (see the note)."
    ),
]


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _ci(iv: list[float] | None) -> str:
    return "" if not iv else f" [{iv[0]:.2f},{iv[1]:.2f}]"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def step_line(step: Step) -> str:
    """``[3/16] qk-restore@3: 12.4 s, recall 0.600, ETA 2 min`` (plain text)."""
    head = f"[{step.index}/{step.total}] {step.name}"
    if step.resumed:
        return f"{head}: from the resume file"
    parts = [f"{step.seconds or 0.0:.1f} s"]
    r = step.result
    for key, label in (
        ("recall_mean", "recall"),
        ("reasoning_score", "reasoning"),
        ("lm_eval_score", "lm-eval"),
    ):
        if r.get(key) is not None:
            parts.append(f"{label} {_f(r[key])}")
    if step.eta_s is not None and step.index < step.total:
        parts.append(f"ETA {_duration(step.eta_s)}")
    return f"{head}: {', '.join(parts)}"


class CliProgress(Progress):
    """On a terminal: a bar per candidate and a ✓ line when it is done; elsewhere (a log file, a
    pipe): one plain line per candidate. Keeps the latest document for an interrupted run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.terminal = enabled and err_console.is_terminal
        self.bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=not self.terminal,
        )
        self.task: Any = None
        self.last: dict[str, Any] | None = None

    def __enter__(self) -> CliProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, index: int, total: int, name: str, units: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(escape(f"[{index}/{total}] {name}"), total=units)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def finish(self, step: Step) -> None:
        if not self.enabled:
            return
        if self.terminal:
            self.bar.console.print(f"[green]✓[/green] {escape(step_line(step))}", highlight=False)
        else:
            err_console.print(step_line(step), highlight=False, soft_wrap=True)

    def document(self, doc: dict[str, Any]) -> None:
        self.last = doc


def _human(json_mode: bool, quiet: bool) -> Console | None:
    if quiet:
        return None
    return err_console if json_mode else out_console


def _interrupted(
    exc: BaseException,
    view: CliProgress,
    results_file: Path | None,
    render: Any,
    json_mode: bool,
    quiet: bool,
) -> typer.Exit:
    """Show what was measured before Ctrl-C / SIGTERM; the exit to raise (130 / 143)."""
    from .app import Terminated

    code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    doc = view.last
    if doc is not None:
        if json_mode:
            emit_json(doc)
        c = _human(json_mode, quiet)
        if c is not None:
            c.print(render(doc))
    done = 0
    if doc is not None:
        done = len(doc.get("candidates") or []) + len(doc.get("ranking") or [])
        done += 1 if doc.get("unablated") else 0
    if done == 0:
        where = ""
    elif results_file is not None:
        where = f"; kept in {results_file} (rerun with --resume {results_file})"
    else:
        where = " (use --json-out FILE to keep results)"
    word = "terminated" if code == EXIT_TERMINATED else "interrupted"
    what = f"{done} measured{where}" if done else "nothing was measured yet"
    err_console.print(f"{word}: {what}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# -- sweep ------------------------------------------------------------------------------------

SWEEP_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore sweep ./base ./sft --lengths 4096,8192 --reasoning my-cot.jsonl --plot "
    "sweep.png\n"
    "  qkrestore sweep ./base ./sft --reasoning example --pick 'max recall@8192 with "
    "reasoning >= 0.95 * POST' --write-recipe pick.yaml\n"
    "  qkrestore sweep ./base ./sft --recall probe.jsonl --reasoning cot.jsonl "
    "--reasoning-metric loglik --json\n"
    "  qkrestore sweep ./base ./sft --json-out s.json   # after Ctrl-C: --resume s.json\n\n"
    "See docs/sweep.md. Exit codes: 0 success; 2 usage or input error; 3 internal error; "
    "130/143 interrupted (results so far kept in --json-out)."
)


def sweep(
    pre: Annotated[Path, typer.Argument(help="Pre-SFT checkpoint folder.")],
    post: Annotated[Path, typer.Argument(help="Post-SFT checkpoint folder (with tokenizer).")],
    layers: LayersOpt = "auto",
    include_sliding: SlidingOpt = False,
    allow_arch_mismatch: ArchOpt = False,
    candidates: Annotated[
        str,
        typer.Option(
            "--candidates",
            help="Groups to evaluate: pre,post,restore,single,top-k,ablations,pro,cross-gram.",
        ),
    ] = "pre,post,restore,single,top-k,ablations,pro,cross-gram",
    ridges: Annotated[
        str, typer.Option("--ridges", help="QK-Pro ridge grid (comma list).")
    ] = "0.1,1,10",
    fixes: Annotated[
        str, typer.Option("--fix", help="QK-Pro sides to sweep: key,query or one of them.")
    ] = "key,query",
    top_k: Annotated[
        str,
        typer.Option(
            "--top-k", help="Sizes k of the top-k candidates (layers ranked by single restore)."
        ),
    ] = "2,4",
    lengths: LengthsOpt = "4096,8192",
    task: TaskOpt = NiahTask.single_2,
    samples: SamplesOpt = 10,
    seed: SeedOpt = 0,
    recall: RecallOpt = None,
    reasoning: Annotated[
        str | None,
        typer.Option(
            "--reasoning",
            help="JSONL of {prompt, answer} for the reasoning metric, or 'example' for the "
            "shipped example file.",
        ),
    ] = None,
    reasoning_metric: Annotated[
        ReasoningMetric,
        typer.Option(
            "--reasoning-metric",
            help="exact: greedy exact match; loglik: mean log-likelihood of the answer.",
        ),
    ] = ReasoningMetric.exact,
    lm_eval: LmEvalOpt = None,
    lm_eval_max_length: LmEvalMaxLenOpt = None,
    lm_eval_limit: LmEvalLimitOpt = None,
    lm_eval_include: LmEvalIncludeOpt = None,
    lm_eval_metric: LmEvalMetricOpt = None,
    pick: Annotated[
        str | None,
        typer.Option(
            "--pick",
            help="Rule choosing one candidate, e.g. 'max recall@8192 with reasoning >= 0.95 "
            "* POST' (default: max recall keeping 95 % of POST's reasoning).",
        ),
    ] = None,
    write_recipe: Annotated[
        Path | None,
        typer.Option(
            "--write-recipe", help="Write a merge/pro recipe (YAML) for the picked candidate."
        ),
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = SweepDType.auto,
    autocast: AutocastOpt = True,
    batch_size: BatchOpt = 8,
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    scoring: ScoringOpt = Scoring.forced,
    beyond_context: BeyondOpt = False,
    plot: PlotOpt = None,
    results_file: JsonOutOpt = None,
    resume: ResumeOpt = None,
    config: RecipeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate restore candidates (PRE, POST, QK-Restore, per layer, top-k, Q/K/V ablations,
    QK-Pro ridge grid, cross-gram) from one load of the model: recall, reasoning, Pareto front.
    """
    from ..api_eval import RecipeNotWritten
    from ..api_eval import sweep as run
    from .app import Terminated

    view = CliProgress(not quiet)
    try:
        with view:
            result = run(
                pre,
                post,
                layers=layers,
                include_sliding=include_sliding,
                allow_arch_mismatch=allow_arch_mismatch,
                candidates=candidates,
                ridges=ridges,
                fix=fixes,
                top_k=top_k,
                lengths=lengths,
                task=task.value,
                samples=samples,
                seed=seed,
                recall=recall,
                reasoning=reasoning,
                reasoning_metric=reasoning_metric.value,
                lm_eval=lm_eval,
                lm_eval_max_length=lm_eval_max_length,
                lm_eval_limit=lm_eval_limit,
                lm_eval_include=lm_eval_include,
                lm_eval_metric=lm_eval_metric,
                pick=pick,
                write_recipe=write_recipe,
                force=force,
                device=device.value,
                dtype=dtype.value,
                autocast=autocast,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
                scoring=scoring.value,
                beyond_context=beyond_context,
                device_map=device_map.value if device_map else None,
                plot=plot,
                json_out=results_file,
                resume=resume,
                progress=view,
                on_note=lambda message: note(message, quiet),
                command=command_text(),
            )
    except RecipeNotWritten as exc:
        _show_sweep(exc.result.to_json(), json_out, quiet)
        raise
    except (KeyboardInterrupt, Terminated) as exc:
        raise _interrupted(
            exc, view, results_file or resume, sweep_table, json_out, quiet
        ) from None
    _show_sweep(result.to_json(), json_out, quiet)


def _show_sweep(doc: dict[str, Any], json_mode: bool, quiet: bool) -> None:
    if json_mode:
        emit_json(doc)
    c = _human(json_mode, quiet)
    if c is None:
        return
    c.print(sweep_table(doc))
    probe = doc.get("probe") or {}
    if not probe.get("decides", True):
        c.print(
            f"[yellow]note:[/yellow] the probe cannot decide: {escape('; '.join(probe['reasons']))}"
            " — no Pareto front is marked",
            highlight=False,
        )
    pick = doc.get("pick") or {}
    name = pick.get("name")
    if name is None:
        c.print(
            f"picked by {pick.get('rule')!r}: none (no candidate meets the rule)", highlight=False
        )
    elif pick.get("decided"):
        c.print(f"picked by {pick['rule']!r}: {name}", highlight=False)
    else:
        c.print(
            f"not picked: the rule {pick['rule']!r} would choose {name}, but the probe cannot "
            f"decide ({escape('; '.join(pick.get('undecided_because') or []))})",
            highlight=False,
        )
    if "recipe" in pick:
        c.print(f"recipe: {pick['recipe']}", highlight=False)
    if "plot" in doc:
        c.print(f"figure: {doc['plot']}", highlight=False)
    if name is None:
        note(f"no candidate meets --pick {pick.get('rule')!r}", quiet)


# -- select-layers ----------------------------------------------------------------------------

SELECT_LAYERS_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore select-layers ./base --lengths 4096,8192 --samples 20\n"
    "  qkrestore select-layers ./base --top 4 --write-recipe top4.yaml --json\n"
    "  qkrestore select-layers ./base --lm-eval niah_single_1 --lengths 4096\n\n"
    "See docs/sweep.md. Exit codes: 0 success; 2 usage or input error; 3 internal error; "
    "130/143 interrupted (results so far kept in --json-out)."
)


def select_layers(
    model: Annotated[
        Path, typer.Argument(help="Model folder (usually PRE, whose routing is intact).")
    ],
    layers: LayersOpt = "auto",
    global_only: Annotated[
        bool,
        typer.Option("--global-only", help="Score only global softmax layers (not sliding)."),
    ] = False,
    lengths: LengthsOpt = "4096,8192",
    task: TaskOpt = NiahTask.single_2,
    samples: SamplesOpt = 10,
    seed: SeedOpt = 0,
    recall: RecallOpt = None,
    lm_eval: LmEvalOpt = None,
    lm_eval_max_length: LmEvalMaxLenOpt = None,
    lm_eval_limit: LmEvalLimitOpt = None,
    lm_eval_include: LmEvalIncludeOpt = None,
    lm_eval_metric: LmEvalMetricOpt = None,
    top: Annotated[
        int | None,
        typer.Option("--top", min=1, help="How many layers --write-recipe keeps."),
    ] = None,
    write_recipe: Annotated[
        Path | None,
        typer.Option(
            "--write-recipe", help="Write a merge recipe (YAML) restoring the --top layers."
        ),
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = SweepDType.auto,
    autocast: AutocastOpt = True,
    batch_size: BatchOpt = 8,
    trust_remote_code: RemoteOpt = False,
    device_map: DeviceMapOpt = None,
    scoring: ScoringOpt = Scoring.forced,
    beyond_context: BeyondOpt = False,
    results_file: JsonOutOpt = None,
    resume: ResumeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank softmax-attention layers by how much retrieval falls when their W_Q is zeroed
    (the paper's Appendix M); optionally write a recipe restoring the top K."""
    from ..api_eval import RecipeNotWritten
    from ..api_eval import select_layers as run
    from .app import Terminated

    view = CliProgress(not quiet)
    try:
        with view:
            result = run(
                model,
                layers=layers,
                global_only=global_only,
                lengths=lengths,
                task=task.value,
                samples=samples,
                seed=seed,
                recall=recall,
                lm_eval=lm_eval,
                lm_eval_max_length=lm_eval_max_length,
                lm_eval_limit=lm_eval_limit,
                lm_eval_include=lm_eval_include,
                lm_eval_metric=lm_eval_metric,
                top=top,
                write_recipe=write_recipe,
                force=force,
                device=device.value,
                dtype=dtype.value,
                autocast=autocast,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
                scoring=scoring.value,
                beyond_context=beyond_context,
                device_map=device_map.value if device_map else None,
                json_out=results_file,
                resume=resume,
                progress=view,
                command=command_text(),
            )
    except RecipeNotWritten as exc:
        _show_select(exc.result.to_json(), json_out, quiet)
        raise
    except (KeyboardInterrupt, Terminated) as exc:
        raise _interrupted(
            exc, view, results_file or resume, select_table, json_out, quiet
        ) from None
    _show_select(result.to_json(), json_out, quiet)


def _show_select(doc: dict[str, Any], json_mode: bool, quiet: bool) -> None:
    if json_mode:
        emit_json(doc)
    c = _human(json_mode, quiet)
    if c is None:
        return
    c.print(select_table(doc))
    probe = doc.get("probe") or {}
    if not probe.get("decides", True):
        c.print(
            f"[yellow]note:[/yellow] the probe cannot decide: {escape('; '.join(probe['reasons']))}"
            " — the ranking is noise",
            highlight=False,
        )
    if "top" in doc:
        c.print(f"top {len(doc['top'])}: {doc['top']}", highlight=False)
    if "recipe" in doc:
        c.print(f"recipe: {doc['recipe']}", highlight=False)


def select_table(doc: dict[str, Any]) -> Table:
    """Layers by drop, with each retrieval score's 95 % interval."""
    base = doc.get("unablated") or {}
    table = Table(
        title=f"select-layers on {doc['model']}: retrieval ({doc['retrieval']}) with each "
        f"layer's W_Q zeroed; unablated {_f(doc.get('unablated_score'))}"
        f"{_ci(base.get('recall_mean_ci'))}"
        + ("" if doc.get("complete", True) else " (interrupted: layers measured so far)")
    )
    for col in ("rank", "layer", "kind", "retrieval", "drop", "95 % CI"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for r in doc["ranking"]:
        score = r.get("recall_mean", r.get("lm_eval_score"))
        table.add_row(
            str(r["rank"]),
            str(r["layer"]),
            r["kind"],
            _f(score),
            _f(r["drop"]),
            _ci(r.get("recall_mean_ci")).strip() or "-",
        )
    return table


def sweep_table(report: dict[str, Any]) -> Table:
    """One row per candidate: recall per length, mean recall and reasoning with their 95 %
    intervals, ★ on the Pareto front and ← at the pick (neither when the probe cannot decide)."""
    rows = report["candidates"]
    decides = (report.get("probe") or {}).get("decides", True)
    pick_doc = report.get("pick") or {}
    keys: list[str] = []
    for r in rows:
        for k in r.get("recall") or {}:
            if k not in keys:
                keys.append(k)
    complete = report.get("complete", True)
    marks = (
        "interrupted: candidates measured so far"
        if not complete
        else "★ Pareto front, ← picked"
        if decides
        else "no front or pick: the probe cannot decide"
    )
    table = Table(
        title=f"sweep: {report['post']} (recall: {report['recall_source'] or '-'}, reasoning: "
        f"{report['reasoning_metric'] or '-'}; {marks})"
    )
    table.add_column("candidate", no_wrap=True)
    table.add_column("layers")
    for k in keys:
        table.add_column(f"recall@{k}", justify="right")
    table.add_column("recall\n[95 % CI]", justify="right")
    table.add_column("reasoning", justify="right")
    has_lm = any(r.get("lm_eval_score") is not None for r in rows)
    if has_lm:
        table.add_column("lm-eval", justify="right")
    table.add_column("", no_wrap=True)
    pick = pick_doc.get("name") if pick_doc.get("decided", True) else None
    for r in rows:
        lay = r.get("planned_layers") or []
        reas = _f(r.get("reasoning_score"))
        if report.get("reasoning_metric") == "exact":
            reas += _ci((r.get("reasoning") or {}).get("exact_ci"))
        cells = [
            r["name"],
            ",".join(map(str, lay)) if lay else "-",
            *(_f((r.get("recall") or {}).get(k)) for k in keys),
            _f(r.get("recall_mean")) + _ci(r.get("recall_mean_ci")),
            reas,
        ]
        if has_lm:
            cells.append(_f(r.get("lm_eval_score")))
        star = "★" if r.get("pareto") and decides and complete else ""
        cells.append(star + (" ←" if r["name"] == pick else ""))
        table.add_row(*cells)
    return fit_columns(table)
