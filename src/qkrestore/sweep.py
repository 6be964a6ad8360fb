"""``qkrestore sweep``: what each way of restoring buys and costs, measured on one loaded model.

Why: whether QK-Restore helps depends on the model (the paper's Table 4 trades recall for reasoning
with QK-Pro; our own reproduction found runs where restoring Q/K cost the whole reasoning gain), so
a user needs to see, on their model, recall and reasoning for every candidate and pick one.

Candidates (groups, in this order): ``pre`` and ``post`` as they are; ``restore`` (QK-Restore of
every planned layer); ``single`` (QK-Restore of one layer at a time); ``top-k`` (QK-Restore of the
k layers whose single-layer restore gained most recall); ``ablations`` (the paper's Table 4:
restore Q only, K only, V only); ``pro`` (QK-Pro over a ridge grid, both fix sides); ``cross-gram``
(QK-Pro's cross-gram form, both fix sides). Each is planned and solved by the tool's own code and
copied into the one loaded POST model (:mod:`qkrestore.candidates`); PRE is loaded last, once.

The functions here are pure where they can be (candidate lists, Pareto front, ``--pick`` rules,
recipes); :func:`run_sweep` does the loading and measuring.
"""

from __future__ import annotations

import gc
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .candidates import Candidate, ModelPatcher, PlanSettings, plan_candidate, plan_values
from .checkpoint import Checkpoint
from .errors import QKRestoreError
from .evaluation import (
    Item,
    LmEvalSettings,
    NiahSettings,
    Runner,
    lm_eval_score,
    load_model,
    load_tokenizer,
    mean,
    needs_tokenizer,
    recall_by_group,
    run_lm_eval,
    summarise_items,
)
from .methods import QKRestore
from .plan import PlanOptions

GROUPS = ("pre", "post", "restore", "single", "top-k", "ablations", "pro", "cross-gram")


@dataclass(frozen=True)
class SweepConfig:
    """Everything ``sweep`` was asked for, already parsed and checked."""

    layers: list[int] | None = None
    include_sliding: bool = False
    allow_arch_mismatch: bool = False
    groups: tuple[str, ...] = GROUPS
    ridges: tuple[float, ...] = (0.1, 1.0, 10.0)
    fixes: tuple[str, ...] = ("key", "query")
    top_k: tuple[int, ...] = (2, 4)
    niah: NiahSettings | None = None
    recall_items: Sequence[Item] | None = None
    reasoning_items: Sequence[Item] | None = None
    reasoning_metric: str = "exact"
    lm_eval: LmEvalSettings | None = None
    device: Any = None  # torch.device
    dtype: Any = None  # torch.dtype
    autocast: bool = True
    batch_size: int = 8  # items scored per forward pass (evaluation.Runner.score_items)
    trust_remote_code: bool = False
    device_map: str | None = None  # accelerate's placement ("auto") for models beyond one device
    adapter_options: dict[str, Any] = field(default_factory=dict)


# -- candidate lists (pure) -----------------------------------------------------------------------


def _r(x: float) -> str:
    return format(x, "g")


def base_candidates(layers: Sequence[int], cfg: SweepConfig) -> list[Candidate]:
    """Every candidate that does not depend on measurements, in report order.

    ``layers`` are the layers QK-Restore plans by default (or ``--layers``); candidates that use
    "all" of them keep ``layers=None`` when ``--layers`` was not given, as ``merge`` would.
    """
    g = set(cfg.groups)
    chosen = tuple(cfg.layers) if cfg.layers is not None else None
    out: list[Candidate] = []
    if "pre" in g:
        out.append(Candidate("pre", "pre", group="pre"))
    if "post" in g:
        out.append(Candidate("post", "post", group="post"))
    if "restore" in g:
        out.append(Candidate("qk-restore", "restore", chosen, group="restore"))
    if "single" in g and len(layers) > 1:
        out += [Candidate(f"qk-restore@{i}", "restore", (i,), group="single") for i in layers]
    if "ablations" in g:
        out += [
            Candidate(f"restore-{t}", "restore", chosen, (t,), group="ablations")
            for t in ("q", "k", "v")
        ]
    if "pro" in g:
        out += [
            Candidate(f"pro-{f}-r{_r(r)}", "pro", chosen, fix=f, ridge=r, group="pro")
            for f in cfg.fixes
            for r in cfg.ridges
        ]
    if "cross-gram" in g:
        out += [
            Candidate(
                f"cross-gram-{f}", "pro", chosen, fix=f, form="cross-gram", group="cross-gram"
            )
            for f in cfg.fixes
        ]
    return out


def rank_single_layers(results: Sequence[dict[str, Any]]) -> list[int]:
    """Layers by the recall their single-layer restore reached (best first; then by reasoning,
    then by layer index), from the ``single`` group's results."""
    singles = [r for r in results if r["group"] == "single" and r.get("recall_mean") is not None]

    def key(r: dict[str, Any]) -> tuple[float, float, int]:
        reas = r.get("reasoning_score")
        return (
            -r["recall_mean"],
            -(reas if reas is not None else -math.inf),
            r["planned_layers"][0],
        )

    return [r["planned_layers"][0] for r in sorted(singles, key=key)]


def top_k_candidates(ranked: Sequence[int], ks: Sequence[int]) -> list[Candidate]:
    """QK-Restore of the k best single layers, for each k with 1 < k < number of layers."""
    out = []
    for k in sorted(set(ks)):
        if 1 < k < len(ranked):
            layers = tuple(sorted(ranked[:k]))
            out.append(Candidate(f"qk-restore-top{k}", "restore", layers, group="top-k"))
    return out


# -- Pareto front and --pick (pure) ---------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which points no other point beats: ≥ on both coordinates and > on one (both maximised).
    Points with a missing coordinate are never on the front."""
    out = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None:
            out.append(False)
            continue
        dominated = any(
            j != i and a is not None and b is not None and a >= x and b >= y and (a > x or b > y)
            for j, (a, b) in enumerate(points)
        )
        out.append(not dominated)
    return out


METRIC_RE = re.compile(r"^(recall(@[^\s]+)?|reasoning|exact|loglik|lm_eval)$", re.IGNORECASE)
OPS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}
NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Bound:
    """The right-hand side of a condition: ``scale × REF + offset``, or a plain number."""

    scale: float = 1.0
    ref: str | None = None
    offset: float = 0.0


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    bound: Bound


@dataclass(frozen=True)
class PickRule:
    """``max|min METRIC [with COND [and COND]…]`` — see :func:`parse_pick`."""

    goal: str
    metric: str
    conditions: tuple[Condition, ...]
    text: str


def _tokens(text: str) -> list[str]:
    t = text.replace("≥", " >= ").replace("≤", " <= ").replace("×", " * ")
    t = re.sub(r"(>=|<=|(?<![<>])[<>](?!=))", r" \1 ", t)
    t = re.sub(r"(?<=\d)\s*\*\s*|\s+\*\s*", " * ", t)
    t = re.sub(r"(?<=\s)x(?=\s)", "*", t)
    return t.split()


def parse_pick(text: str) -> PickRule:
    """Parse a ``--pick`` rule, e.g. ``max recall@8192 with reasoning ≥ 0.95 × POST``.

    Grammar: ``(max|min) METRIC [(with|where) COND (and COND)*]``; ``COND`` is ``METRIC OP BOUND``
    with ``OP`` one of ``>= ≥ > <= ≤ <``; ``BOUND`` is a number, or
    ``[NUMBER (×|*|x)] CANDIDATE [(+|-) NUMBER]`` where ``CANDIDATE`` (``POST``, ``PRE``,
    ``qk-restore``, …; any case) stands for that candidate's value of the same metric.
    ``METRIC`` is ``recall`` (mean over lengths), ``recall@LEN``, ``reasoning`` (the chosen
    reasoning metric), ``exact``, ``loglik`` or ``lm_eval``.
    """
    err = f"--pick {text!r}"
    toks = _tokens(text)
    if len(toks) < 2 or toks[0].lower() not in ("max", "min"):
        raise QKRestoreError(f"{err}: start with 'max' or 'min' and a metric, e.g. 'max recall'")
    goal, metric = toks[0].lower(), toks[1]
    if not METRIC_RE.match(metric):
        raise QKRestoreError(
            f"{err}: unknown metric '{metric}'",
            hint="use recall, recall@LEN, reasoning, exact, loglik or lm_eval",
        )
    rest = toks[2:]
    conds: list[Condition] = []
    if rest:
        if rest[0].lower() not in ("with", "where", "if"):
            raise QKRestoreError(f"{err}: expected 'with' after the metric, got '{rest[0]}'")
        chunks: list[list[str]] = [[]]
        for t in rest[1:]:
            if t.lower() == "and":
                chunks.append([])
            else:
                chunks[-1].append(t)
        for chunk in chunks:
            conds.append(_condition(chunk, err))
    return PickRule(goal, metric.lower(), tuple(conds), text)


def _condition(toks: list[str], err: str) -> Condition:
    if len(toks) < 3 or not METRIC_RE.match(toks[0]) or toks[1] not in OPS:
        raise QKRestoreError(
            f"{err}: a condition reads 'METRIC OP BOUND', e.g. 'reasoning >= 0.95 * POST', "
            f"not {' '.join(toks)!r}"
        )
    metric, op, rhs = toks[0].lower(), toks[1], toks[2:]
    if len(rhs) == 1 and NUMBER_RE.match(rhs[0]):
        return Condition(metric, op, Bound(scale=0.0, offset=float(rhs[0])))
    scale, offset = 1.0, 0.0
    if len(rhs) >= 3 and rhs[1] == "*" and NUMBER_RE.match(rhs[0]):
        scale, rhs = float(rhs[0]), rhs[2:]
    if not rhs or NUMBER_RE.match(rhs[0]) or rhs[0] in OPS or rhs[0] in "*+-":
        raise QKRestoreError(f"{err}: cannot read the bound {' '.join(toks[2:])!r}")
    ref, rhs = rhs[0].lower(), rhs[1:]
    if rhs:
        if len(rhs) != 2 or rhs[0] not in "+-" or not NUMBER_RE.match(rhs[1]):
            raise QKRestoreError(f"{err}: cannot read the bound {' '.join(toks[2:])!r}")
        offset = float(rhs[1]) * (1 if rhs[0] == "+" else -1)
    return Condition(metric, op, Bound(scale, ref, offset))


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    """A candidate's value of a ``--pick`` metric (None when it was not measured)."""
    if metric == "recall":
        return result.get("recall_mean")
    if metric.startswith("recall@"):
        return (result.get("recall") or {}).get(metric.split("@", 1)[1])
    if metric == "reasoning":
        return result.get("reasoning_score")
    if metric in ("exact", "loglik"):
        return (result.get("reasoning") or {}).get(metric)
    if metric == "lm_eval":
        return result.get("lm_eval_score")
    return None


def choose(rule: PickRule, results: Sequence[dict[str, Any]]) -> int | None:
    """Index of the candidate the rule picks (the first in report order among equals), or None."""
    by_name = {r["name"].lower(): r for r in results}
    for c in rule.conditions:
        if c.bound.ref is not None and c.bound.ref not in by_name:
            raise QKRestoreError(
                f"--pick {rule.text!r}: no candidate named '{c.bound.ref}'",
                hint=f"candidates: {', '.join(r['name'] for r in results)}",
            )
    best: int | None = None
    best_value = 0.0
    for i, r in enumerate(results):
        v = metric_value(r, rule.metric)
        if v is None or not math.isfinite(v):
            continue
        ok = True
        for c in rule.conditions:
            left = metric_value(r, c.metric)
            if c.bound.ref is None:
                right: float | None = c.bound.offset
            else:
                ref = metric_value(by_name[c.bound.ref], c.metric)
                right = None if ref is None else c.bound.scale * ref + c.bound.offset
            if left is None or right is None or not OPS[c.op](left, right):
                ok = False
                break
        if not ok:
            continue
        better = v > best_value if rule.goal == "max" else v < best_value
        if best is None or better:
            best, best_value = i, v
    return best


def default_pick(reasoning_metric: str) -> str:
    """Most recall that keeps the reasoning: 95 % of POST's exact match, or POST's log-likelihood
    less 0.05 nats per token (a fraction of a negative number would be a stricter bound)."""
    if reasoning_metric == "loglik":
        return "max recall with reasoning >= POST - 0.05"
    return "max recall with reasoning >= 0.95 * POST"


# -- recipes --------------------------------------------------------------------------------------


def recipe_text(cand: Candidate, planned_layers: list[int], include_sliding: bool, why: str) -> str:
    """A YAML recipe for ``merge --config`` / ``pro --config`` that rebuilds ``cand``."""
    keys = cand.recipe(planned_layers, include_sliding)
    head = f"# {why}\n# use: qkrestore {cand.command()} PRE POST -o OUT --config THIS_FILE\n"
    return head + yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)


def write_recipe(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise QKRestoreError(f"--write-recipe {path}: cannot write ({exc.strerror})") from None


# -- running --------------------------------------------------------------------------------------


class SweepProgress:
    """What :func:`run_sweep` reports while it runs; the CLI draws it, tests may ignore it."""

    def start(self, index: int, total: int, name: str, units: int) -> None:
        """A candidate begins; ``units`` is the number of advance() calls to expect."""

    def advance(self, n: int = 1) -> None:
        """One unit of evaluation (a prompt, an item, a task run) is done."""

    def finish(self, result: dict[str, Any]) -> None:
        """A candidate is measured."""


def units(cfg: SweepConfig) -> int:
    n = 1  # planning and copying rows in
    if cfg.niah is not None and cfg.recall_items is None:
        n += len(cfg.niah.lengths) * cfg.niah.samples
    n += len(cfg.recall_items or ()) + len(cfg.reasoning_items or ())
    return n + (1 if cfg.lm_eval is not None else 0)


def measure(
    runner: Runner, cfg: SweepConfig, tokenizer: Any, advance: Callable[[int], None]
) -> dict[str, Any]:
    """Recall (NIAH or a recall file), reasoning and lm-eval scores of the weights loaded now."""
    out: dict[str, Any] = {}
    if cfg.recall_items is not None:
        rows = runner.score_items(cfg.recall_items, advance)
        out["recall"] = recall_by_group(cfg.recall_items, rows)
    elif cfg.niah is not None:
        out["recall"] = runner.niah(cfg.niah, advance)
    if "recall" in out:
        out["recall_mean"] = mean(list(out["recall"].values()))
    if cfg.reasoning_items is not None:
        summary = summarise_items(runner.score_items(cfg.reasoning_items, advance))
        out["reasoning"] = summary
        out["reasoning_score"] = summary[cfg.reasoning_metric]
    if cfg.lm_eval is not None:
        res = run_lm_eval(runner.model, tokenizer, runner.device, cfg.lm_eval, cfg.autocast)
        out["lm_eval"] = res
        out["lm_eval_score"] = lm_eval_score(res, cfg.lm_eval.metric)
        advance(1)
    return out


def needs_tok(cfg: SweepConfig) -> bool:
    return (
        (cfg.niah is not None and cfg.recall_items is None)
        or needs_tokenizer(cfg.recall_items or ())
        or needs_tokenizer(cfg.reasoning_items or ())
        or cfg.lm_eval is not None
    )


def run_sweep(
    pre_dir: Path,
    post_dir: Path,
    cfg: SweepConfig,
    progress: SweepProgress | None = None,
    refs: Sequence[str] = (),
) -> dict[str, Any]:
    """Measure every candidate; the ``sweep`` JSON document (without the pick).

    ``refs`` are candidate names a ``--pick`` rule refers to: checked once the candidate list is
    known, before any model is loaded, so that a typo does not cost a whole sweep.
    """
    progress = progress or SweepProgress()
    t_start = time.perf_counter()
    with Checkpoint.open(pre_dir) as pre, Checkpoint.open(post_dir) as post:
        settings = PlanSettings(
            include_sliding=cfg.include_sliding,
            allow_arch_mismatch=cfg.allow_arch_mismatch,
            device=cfg.device.type,
            adapter_options=cfg.adapter_options,
        )
        base = QKRestore(
            PlanOptions(
                layers=cfg.layers,
                include_sliding=cfg.include_sliding,
                allow_arch_mismatch=cfg.allow_arch_mismatch,
                adapter_options=dict(cfg.adapter_options),
            )
        ).plan(pre, post)
        cands = base_candidates(base.layers, cfg)
        known = {c.name for c in cands} | {
            c.name for c in top_k_candidates(base.layers, cfg.top_k) if "top-k" in cfg.groups
        }
        for ref in refs:
            if ref not in known:
                raise QKRestoreError(
                    f"--pick: no candidate named '{ref}'",
                    hint=f"candidates: {', '.join(sorted(known))}",
                )
        # Plan every candidate before loading anything: a refused plan fails in a second.
        plans = {
            c.name: plan_candidate(c, pre, post, settings)
            for c in cands
            if c.kind in ("restore", "pro")
        }
        tokenizer = load_tokenizer(post_dir) if needs_tok(cfg) else None
        model = load_model(post_dir, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.device_map)
        runner = Runner.from_settings(model, tokenizer, cfg, str(post_dir))
        patcher = ModelPatcher(model)
        results: dict[str, dict[str, Any]] = {}
        order = [c for c in cands if c.kind != "pre"]
        total = len(cands) + len(top_k_candidates(base.layers, cfg.top_k)) * ("top-k" in cfg.groups)
        done = 0

        def run_one(c: Candidate) -> None:
            nonlocal done
            done += 1
            progress.start(done, total, c.name, units(cfg))
            t0 = time.perf_counter()
            planned: list[int] = []
            if c.kind in ("restore", "pro"):
                plan = plans.get(c.name) or plan_candidate(c, pre, post, settings)
                plans[c.name] = plan
                patcher.apply(plan, plan_values(plan, pre, post))
                planned = plan.layers
            elif c.kind == "post":
                patcher.reset()
            progress.advance(1)
            res = {**c.to_json(), "planned_layers": planned}
            res.update(measure(runner, cfg, tokenizer, progress.advance))
            res["seconds"] = round(time.perf_counter() - t0, 3)
            results[c.name] = res
            progress.finish(res)

        for c in order:
            run_one(c)
        top = []
        if "top-k" in cfg.groups:
            ranked = rank_single_layers(list(results.values()))
            top = top_k_candidates(ranked, cfg.top_k)
            for c in top:
                run_one(c)
        patcher.reset()
        if "pre" in cfg.groups:
            pre_cand = next(c for c in cands if c.kind == "pre")
            runner.model = None
            patcher.close()
            del model
            gc.collect()
            if cfg.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
            runner.model = load_model(
                pre_dir, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.device_map
            )
            run_one(pre_cand)
    ordered = [
        results[c.name]
        for c in [*cands[: _after_single(cands)], *top, *cands[_after_single(cands) :]]
        if c.name in results
    ]
    flags = pareto_front([(r.get("recall_mean"), r.get("reasoning_score")) for r in ordered])
    for r, f in zip(ordered, flags):
        r["pareto"] = f
    return {
        "pre": str(pre_dir),
        "post": str(post_dir),
        "layers": base.layers,
        "device": str(cfg.device),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "autocast": bool(cfg.autocast and cfg.device.type == "cuda"),
        "recall_source": (
            "recall-file" if cfg.recall_items is not None else "niah" if cfg.niah else None
        ),
        "niah": (
            {
                "task": cfg.niah.task,
                "lengths": list(cfg.niah.lengths),
                "samples": cfg.niah.samples,
                "seed": cfg.niah.seed,
            }
            if cfg.niah is not None and cfg.recall_items is None
            else None
        ),
        "reasoning_metric": cfg.reasoning_metric if cfg.reasoning_items is not None else None,
        "lm_eval_tasks": list(cfg.lm_eval.tasks) if cfg.lm_eval else None,
        "candidates": ordered,
        "seconds": round(time.perf_counter() - t_start, 3),
    }


def _after_single(cands: Sequence[Candidate]) -> int:
    """Where the top-k candidates go in the report: right after the single-layer ones."""
    idx = [i for i, c in enumerate(cands) if c.group in ("pre", "post", "restore", "single")]
    return (max(idx) + 1) if idx else 0
