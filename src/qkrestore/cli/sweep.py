"""The ``sweep`` and ``select-layers`` commands.

A thin shell like :mod:`qkrestore.cli.diagnostics`: parse and check every option (and that optional
packages are there) before a model is loaded, call :mod:`qkrestore.sweep` /
:mod:`qkrestore.select_layers`, render. ``--json`` puts one JSON document on stdout; the progress
bar and notes go to stderr.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import QKRestoreError
from ..lora import is_adapter_source
from ..runtime import choose_device, model_dtype_for
from .options import (
    ArchOpt,
    DeviceChoice,
    DeviceOpt,
    JsonOpt,
    LayersOpt,
    QuietOpt,
    RecipeOpt,
    RemoteOpt,
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
        "'eval' extra), e.g. niah_single_1.",
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
        help="Weights' dtype in memory: auto = float32 (exact for F32/BF16/F16 checkpoints; on "
        "CUDA the forward pass runs under bf16 autocast).",
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


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QKRestoreError(f"{option} {text!r}: give numbers, e.g. 0.1,1,10") from None
    if not vals or any(not (v >= 0 and math.isfinite(v)) for v in vals):
        raise QKRestoreError(f"{option} {text!r}: give finite numbers ≥ 0")
    return vals


def _ints(text: str, option: str, low: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QKRestoreError(f"{option} {text!r}: give integers, e.g. 2,4") from None
    if not vals or any(v < low for v in vals):
        raise QKRestoreError(f"{option} {text!r}: give integers ≥ {low}")
    return vals


def _device(device: DeviceChoice, dtype: SweepDType) -> tuple[Any, Any]:
    """The device, and the weights' dtype in memory: float32 unless asked (a sweep swaps exact
    rows in, and autocast, not the stored dtype, makes the forward pass fast on a GPU)."""
    dev, _ = choose_device(device.value)
    return dev, model_dtype_for(dev, "float32" if dtype is SweepDType.auto else dtype.value)


def _folder(path: Path, label: str) -> Path:
    if not Path(path).is_dir():
        raise QKRestoreError(f"{label} {path}: not a local model folder (sweep loads the model)")
    return Path(path)


@contextlib.contextmanager
def _merged_post(adapter: Path, pre: Path, quiet: bool) -> Iterator[Path]:
    """POST = PRE + the adapter merged whole, as a temporary checkpoint for the sweep to load.

    Candidates are then planned on PRE and that POST exactly as for full checkpoints, and a
    recipe written from the sweep applies to the adapter itself (``merge`` takes adapters).
    """
    from ..lora import write_merged_post

    with tempfile.TemporaryDirectory(prefix="qkrestore-sweep-post-") as tmp:
        note(f"POST is a PEFT adapter: sweeping PRE + adapter, merged into {tmp}", quiet)
        yield write_merged_post(pre, adapter, Path(tmp) / "post")


def _niah(lengths: str, task: NiahTask, samples: int, seed: int) -> Any:
    from ..evaluation import NiahSettings

    lens = _ints(lengths, "--lengths", 64)
    return NiahSettings(lengths=lens, task=task.value, samples=samples, seed=seed)


def _lm_eval(
    tasks: str | None,
    tokenizer_path: Path,
    max_length: int | None,
    limit: float | None,
    include: Path | None,
    metric: str | None,
    lengths: tuple[int, ...],
) -> Any:
    if tasks is None:
        return None
    from ..evaluation import LmEvalSettings, require_lm_eval

    require_lm_eval()
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise QKRestoreError(f"--lm-eval {tasks!r}: name at least one task")
    if include is not None and not include.is_dir():
        raise QKRestoreError(f"--lm-eval-include {include}: not a folder")
    return LmEvalSettings(
        tasks=names,
        tokenizer_path=str(tokenizer_path),
        max_length=max_length,
        lengths=lengths,
        limit=limit,
        include_path=str(include) if include else None,
        metric=metric,
    )


class BarProgress:
    """One rich progress bar per candidate on stderr, and one line per finished candidate."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=not enabled,
        )
        self.task: Any = None
        self.label = ""

    def __enter__(self) -> BarProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, index: int, total: int, name: str, units: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.label = f"[{index}/{total}] {name}"
        self.task = self.bar.add_task(escape(self.label), total=units)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def finish(self, result: dict[str, Any]) -> None:
        if self.enabled:
            self.bar.console.print(
                f"[green]✓[/green] {escape(self.label)}: recall {_f(result.get('recall_mean'))}, "
                f"reasoning {_f(result.get('reasoning_score'))} ({result['seconds']:.1f} s)",
                highlight=False,
            )


def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _human(json_mode: bool, quiet: bool) -> Console | None:
    if quiet:
        return None
    return err_console if json_mode else out_console


# -- sweep ------------------------------------------------------------------------------------

SWEEP_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore sweep ./base ./sft --lengths 4096,8192 --reasoning my-cot.jsonl --plot "
    "sweep.png\n"
    "  qkrestore sweep ./base ./sft --reasoning example --pick 'max recall@8192 with "
    "reasoning >= 0.95 * POST' --write-recipe pick.yaml\n"
    "  qkrestore sweep ./base ./sft --recall probe.jsonl --reasoning cot.jsonl "
    "--reasoning-metric loglik --json\n\n"
    "See docs/sweep.md. Exit codes: 0 success; 2 usage or input error; 3 internal error."
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
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = SweepDType.auto,
    autocast: AutocastOpt = True,
    batch_size: BatchOpt = 8,
    trust_remote_code: RemoteOpt = False,
    plot: PlotOpt = None,
    config: RecipeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate restore candidates (PRE, POST, QK-Restore, per layer, top-k, Q/K/V ablations,
    QK-Pro ridge grid, cross-gram) from one load of the model: recall, reasoning, Pareto front.
    """
    from ..candidates import Candidate
    from ..evaluation import example_reasoning_file, load_items
    from ..plan import parse_layers
    from ..sweep import (
        GROUPS,
        SweepConfig,
        choose,
        default_pick,
        parse_pick,
        recipe_text,
        run_sweep,
    )
    from ..sweep import (
        write_recipe as write_recipe_file,
    )

    pre_dir = _folder(pre, "PRE")
    adapter = is_adapter_source(post)  # POST = PRE + adapter: PRE's config describes it
    post_dir = pre_dir if adapter else _folder(post, "POST")
    groups = tuple(g.strip() for g in candidates.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if not groups or bad:
        raise QKRestoreError(
            f"--candidates {candidates!r}: use a comma list of {', '.join(GROUPS)}"
        )
    fix_sides = tuple(f.strip() for f in fixes.split(",") if f.strip())
    if not fix_sides or any(f not in ("key", "query") for f in fix_sides):
        raise QKRestoreError(f"--fix {fixes!r}: use key, query or key,query")
    rule = parse_pick(pick or default_pick(reasoning_metric.value))
    if plot is not None:
        from ..diagnostics import plots

        plots.check_target(plot)
    niah = _niah(lengths, task, samples, seed)
    lens = niah.lengths  # also the lengths lm-eval's RULER tasks are built for
    niah = niah if recall is None else None
    recall_items = load_items(recall, "--recall") if recall is not None else None
    reasoning_items = None
    if reasoning is not None:
        path = example_reasoning_file() if reasoning == "example" else Path(reasoning)
        reasoning_items = load_items(path, "--reasoning")
    lm = _lm_eval(
        lm_eval,
        post_dir,
        lm_eval_max_length,
        lm_eval_limit,
        lm_eval_include,
        lm_eval_metric,
        lens,
    )
    dev, dt = _device(device, dtype)
    cfg = SweepConfig(
        layers=parse_layers(layers),
        include_sliding=include_sliding,
        allow_arch_mismatch=allow_arch_mismatch,
        groups=groups,
        ridges=_floats(ridges, "--ridges"),
        fixes=fix_sides,
        top_k=_ints(top_k, "--top-k", 1),
        niah=niah,
        recall_items=recall_items,
        reasoning_items=reasoning_items,
        reasoning_metric=reasoning_metric.value,
        lm_eval=lm,
        device=dev,
        dtype=dt,
        autocast=autocast,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
    )
    merged = _merged_post(post, pre_dir, quiet) if adapter else contextlib.nullcontext(post_dir)
    with merged as run_post, BarProgress(not quiet) as bar:
        refs = [c.bound.ref for c in rule.conditions if c.bound.ref is not None]
        report = run_sweep(pre_dir, run_post, cfg, bar, refs)
    if adapter:
        report["post"], report["post_is_adapter"] = str(post), True
    results = report["candidates"]
    idx = choose(rule, results)
    report["pick"] = {
        "rule": rule.text,
        "name": results[idx]["name"] if idx is not None else None,
    }
    recipe_error = None
    if write_recipe is not None:
        if idx is None:
            recipe_error = QKRestoreError(
                f"--pick {rule.text!r}: no candidate meets the rule, so no recipe was written",
                hint="loosen the rule (see the table)",
            )
        else:
            r = results[idx]
            cand = Candidate(
                r["name"],
                r["kind"],
                tuple(r["planned_layers"]) or None,
                tuple(r.get("targets", ("q", "k"))),
                r.get("fix"),
                r.get("ridge"),
                r.get("form", "ridge"),
                r["group"],
            )
            try:
                text = recipe_text(
                    cand,
                    r["planned_layers"],
                    include_sliding,
                    f"candidate '{r['name']}' picked by: {command_text()}",
                )
            except QKRestoreError as exc:
                recipe_error = exc
            else:
                write_recipe_file(write_recipe, text)
                report["pick"]["recipe"] = str(write_recipe)
    if plot is not None:
        plots.sweep_figure(report, plot)
        report["plot"] = str(plot)
    if json_out:
        emit_json(report)
    c = _human(json_out, quiet)
    if c is not None:
        c.print(_sweep_table(report))
        name = report["pick"]["name"]
        c.print(
            f"picked by {rule.text!r}: {name or 'none (no candidate meets the rule)'}",
            highlight=False,
        )
        if "recipe" in report["pick"]:
            c.print(f"recipe: {report['pick']['recipe']}", highlight=False)
        if plot is not None:
            c.print(f"figure: {plot}", highlight=False)
    if recipe_error is not None:
        raise recipe_error
    if idx is None:
        note(f"no candidate meets --pick {rule.text!r}", quiet)


# -- select-layers ----------------------------------------------------------------------------

SELECT_LAYERS_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  qkrestore select-layers ./base --lengths 4096,8192 --samples 20\n"
    "  qkrestore select-layers ./base --top 4 --write-recipe top4.yaml --json\n"
    "  qkrestore select-layers ./base --lm-eval niah_single_1 --lengths 4096\n\n"
    "See docs/sweep.md. Exit codes: 0 success; 2 usage or input error; 3 internal error."
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
    device: DeviceOpt = DeviceChoice.auto,
    dtype: DTypeOpt = SweepDType.auto,
    autocast: AutocastOpt = True,
    batch_size: BatchOpt = 8,
    trust_remote_code: RemoteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank softmax-attention layers by how much retrieval falls when their W_Q is zeroed
    (the paper's Appendix M); optionally write a recipe restoring the top K."""
    from ..plan import parse_layers
    from ..select_layers import SelectConfig, run_select_layers, select_recipe
    from ..sweep import write_recipe as write_recipe_file

    model_dir = _folder(model, "MODEL")
    if write_recipe is not None and top is None:
        raise QKRestoreError("--write-recipe needs --top K (how many layers to keep)")
    use_niah = recall is None and lm_eval is None
    niah = _niah(lengths, task, samples, seed) if use_niah else None
    lens = _ints(lengths, "--lengths", 64) if lm_eval is not None else ()
    lm = _lm_eval(
        lm_eval,
        model_dir,
        lm_eval_max_length,
        lm_eval_limit,
        lm_eval_include,
        lm_eval_metric,
        lens,
    )
    from ..evaluation import load_items

    recall_items = load_items(recall, "--recall") if recall is not None else None
    dev, dt = _device(device, dtype)
    cfg = SelectConfig(
        layers=parse_layers(layers),
        include_sliding=not global_only,
        niah=niah,
        recall_items=recall_items,
        lm_eval=lm,
        device=dev,
        dtype=dt,
        autocast=autocast,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
    )
    with BarProgress(not quiet) as bar:
        report = run_select_layers(model_dir, cfg, bar.start, bar.advance)
    if top is not None:
        if top > len(report["ranking"]):
            raise QKRestoreError(
                f"--top {top}: the model has only {len(report['ranking'])} scored layers"
            )
        report["top"] = sorted(r["layer"] for r in report["ranking"][:top])
        if write_recipe is not None:
            write_recipe_file(write_recipe, select_recipe(model_dir, report["top"], command_text()))
            report["recipe"] = str(write_recipe)
    if json_out:
        emit_json(report)
    c = _human(json_out, quiet)
    if c is None:
        return
    table = Table(
        title=f"select-layers on {model}: retrieval ({report['retrieval']}) with each "
        f"layer's W_Q zeroed; unablated {_f(report['unablated_score'])}"
    )
    for col in ("rank", "layer", "kind", "retrieval", "drop"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    for r in report["ranking"]:
        score = r.get("recall_mean", r.get("lm_eval_score"))
        table.add_row(str(r["rank"]), str(r["layer"]), r["kind"], _f(score), _f(r["drop"]))
    c.print(table)
    if "top" in report:
        c.print(f"top {top}: {report['top']}", highlight=False)
    if "recipe" in report:
        c.print(f"recipe: {report['recipe']}", highlight=False)


def _sweep_table(report: dict[str, Any]) -> Table:
    rows = report["candidates"]
    keys: list[str] = []
    for r in rows:
        for k in r.get("recall") or {}:
            if k not in keys:
                keys.append(k)
    table = Table(
        title=f"sweep: {report['post']} (recall: {report['recall_source'] or '-'}, reasoning: "
        f"{report['reasoning_metric'] or '-'}; ★ Pareto front, ← picked)"
    )
    table.add_column("candidate", no_wrap=True)
    table.add_column("layers")
    for k in keys:
        table.add_column(f"recall@{k}", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("reasoning", justify="right")
    has_lm = any(r.get("lm_eval_score") is not None for r in rows)
    if has_lm:
        table.add_column("lm-eval", justify="right")
    table.add_column("", no_wrap=True)
    pick = (report.get("pick") or {}).get("name")
    for r in rows:
        lay = r.get("planned_layers") or []
        cells = [
            r["name"],
            ",".join(map(str, lay)) if lay else "-",
            *(_f((r.get("recall") or {}).get(k)) for k in keys),
            _f(r.get("recall_mean")),
            _f(r.get("reasoning_score")),
        ]
        if has_lm:
            cells.append(_f(r.get("lm_eval_score")))
        cells.append(("★" if r.get("pareto") else "") + (" ←" if r["name"] == pick else ""))
        table.add_row(*cells)
    return fit_columns(table)
