"""``qkrestore sweep``: what each way of restoring buys and costs, measured on one loaded model.

Why: whether QK-Restore helps depends on the model (the paper's Table 4 trades recall for reasoning
with QK-Pro; our own reproduction found runs where restoring Q/K cost the whole reasoning gain), so
a user needs to see, on their model, recall and reasoning for every candidate and pick one.

Candidates (groups, in this order): ``pre`` and ``post`` as they are; ``restore`` (QK-Restore of
every planned layer); ``single`` (QK-Restore of one layer at a time); ``top-k`` (QK-Restore of the
k layers whose single-layer restore gained most recall); ``ablations`` (the paper's Table 4:
restore Q only, K only, V only); ``pro`` (QK-Pro over a ridge grid, both fix sides); ``cross-gram``
(QK-Pro's cross-gram form, both fix sides). Each is planned and solved by the tool's own code and
copied into the one loaded POST model (:mod:`qkrestore.evaluate.candidates`); PRE is loaded last, once.

The functions here are pure where they can be (candidate lists, Pareto front, ``--pick`` rules,
recipes); :func:`run_sweep` does the loading and measuring.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapter import is_adapter_source
from ..errors import PlanError, QKRestoreError
from ..io.checkpoint import Checkpoint
from ..surgery.methods import QKRestore
from ..surgery.plan import PlanOptions
from .candidates import Candidate, ModelPatcher, PlanSettings, plan_candidate, plan_values
from .measuring import binomial, folder, measure, measure_settings, needs_tok, niah_doc
from .probe import Verdict, verdict
from .runlog import Clock, Progress, Saving, Step, check_writable, load_resume, write_json_atomic
from .runner import Item, LmEvalSettings, NiahSettings, Runner, load_model, load_tokenizer

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


def needs_merged_output(cand: Candidate, post_is_adapter: bool) -> bool:
    """Whether the command that rebuilds ``cand`` from a PEFT adapter POST must write a full
    checkpoint: QK-Pro's cross-gram form has no low-rank (adapter) solution, so ``pro ADAPTER``
    takes it only with ``--merge-adapter``."""
    return post_is_adapter and cand.kind == "pro" and cand.form == "cross-gram"


def recipe_text(
    cand: Candidate,
    planned_layers: list[int],
    include_sliding: bool,
    why: str,
    post_is_adapter: bool = False,
) -> str:
    """A YAML recipe for ``merge --config`` / ``pro --config`` that rebuilds ``cand``; the command
    its comment names accepts it (for an adapter POST too, see :func:`needs_merged_output`)."""
    keys = cand.recipe(planned_layers, include_sliding)
    if needs_merged_output(cand, post_is_adapter):
        keys["merge_adapter"] = True
    head = f"# {why}\n# use: qkrestore {cand.command()} PRE POST -o OUT --config THIS_FILE\n"
    if post_is_adapter:
        head += "# (POST is the PEFT adapter the sweep measured, PRE its base)\n"
    return head + yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)


def write_recipe(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise QKRestoreError(f"--write-recipe {path}: cannot write ({exc.strerror})") from None


def candidate_from_json(r: dict[str, Any]) -> Candidate:
    """The candidate a result row of the ``sweep`` document describes."""
    return Candidate(
        r["name"],
        r["kind"],
        tuple(r["planned_layers"]) or None,
        tuple(r.get("targets", ("q", "k"))),
        r.get("fix"),
        r.get("ridge"),
        r.get("form", "ridge"),
        r["group"],
    )


def sweep_settings(cfg: SweepConfig, pre: Path, post: Path | str) -> dict[str, Any]:
    """Everything that decides a sweep's numbers; a resume file must have been written with these."""
    return {
        "command": "sweep",
        "pre": str(Path(pre).resolve()),
        "post": str(Path(post).resolve()),
        "layers": cfg.layers,
        "include_sliding": cfg.include_sliding,
        "allow_arch_mismatch": cfg.allow_arch_mismatch,
        "groups": list(cfg.groups),
        "ridges": list(cfg.ridges),
        "fixes": list(cfg.fixes),
        "top_k": list(cfg.top_k),
        **measure_settings(cfg),
    }


# -- measuring ------------------------------------------------------------------------------------


def units(cfg: SweepConfig) -> int:
    n = 1  # planning and copying rows in
    if cfg.niah is not None and cfg.recall_items is None:
        n += len(cfg.niah.lengths) * cfg.niah.samples
    n += len(cfg.recall_items or ()) + len(cfg.reasoning_items or ())
    return n + (1 if cfg.lm_eval is not None else 0)


class _Loaded:
    """The one loaded model (POST, then PRE), its runner and patcher, loaded on first use: a
    resumed run whose candidates are all in the file loads nothing."""

    def __init__(self, cfg: SweepConfig, post_dir: Path) -> None:
        self.cfg = cfg
        self.post_dir = post_dir
        self.tokenizer: Any = None
        self.runner: Runner | None = None
        self.patcher: ModelPatcher | None = None
        self.which: str | None = None

    def _tok(self) -> Any:
        if self.tokenizer is None and needs_tok(self.cfg):
            self.tokenizer = load_tokenizer(self.post_dir)
        return self.tokenizer

    def post(self) -> tuple[Runner, ModelPatcher]:
        if self.runner is None or self.patcher is None:
            model = load_model(
                self.post_dir,
                self.cfg.device,
                self.cfg.dtype,
                self.cfg.trust_remote_code,
                self.cfg.device_map,
            )
            self.runner = Runner.from_settings(model, self._tok(), self.cfg, str(self.post_dir))
            self.patcher = ModelPatcher(model)
            self.which = "post"
        return self.runner, self.patcher

    def pre(self, pre_dir: Path) -> Runner:
        """Load PRE in place of POST (POST's memory freed first)."""
        tok = self._tok()
        if self.patcher is not None:
            self.patcher.reset()
            self.patcher.close()
        if self.runner is not None:
            self.runner.model = None
        gc.collect()
        if self.cfg.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        model = load_model(
            pre_dir,
            self.cfg.device,
            self.cfg.dtype,
            self.cfg.trust_remote_code,
            self.cfg.device_map,
        )
        if self.runner is None:
            self.runner = Runner.from_settings(model, tok, self.cfg, str(self.post_dir))
        self.runner.model = model
        self.patcher, self.which = None, "pre"
        return self.runner

    def close(self) -> None:
        if self.patcher is not None and self.which == "post":
            self.patcher.reset()


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    """A result row from a results file, without what the whole sweep decides afterwards."""
    return {k: v for k, v in result.items() if k != "pareto"}


def run_sweep(
    pre_dir: Path,
    post_dir: Path,
    cfg: SweepConfig,
    progress: Progress | None = None,
    refs: Sequence[str] = (),
    *,
    done: Sequence[dict[str, Any]] = (),
    post_label: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure every candidate; the ``sweep`` JSON document before the Pareto front and the pick
    (:func:`finish_sweep`).

    ``refs`` are candidate names a ``--pick`` rule refers to: checked once the candidate list is
    known, before any model is loaded, so that a typo does not cost a whole sweep. ``done`` are
    result rows of an earlier run with the same settings: those candidates are not measured again.
    After every candidate, ``progress.document`` receives the document so far.
    """
    progress = progress or Progress()
    prior = {r["name"]: _strip(r) for r in done}
    t_start = time.perf_counter()
    with Checkpoint.open(pre_dir) as pre, Checkpoint.open(post_dir) as post:
        plan_settings = PlanSettings(
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
        later = top_k_candidates(base.layers, cfg.top_k) if "top-k" in cfg.groups else []
        names = [c.name for c in cands] + [c.name for c in later]
        for ref in refs:
            if ref not in names:
                raise QKRestoreError(
                    f"--pick: no candidate named '{ref}'",
                    hint=f"candidates: {', '.join(sorted(names))}",
                )
        # Plan every candidate before loading anything: a refused plan fails in a second.
        plans = {
            c.name: plan_candidate(c, pre, post, plan_settings)
            for c in cands
            if c.kind in ("restore", "pro") and c.name not in prior
        }
        head = _header(cfg, pre_dir, post_label or str(post_dir), base.layers, settings)
        loaded = _Loaded(cfg, post_dir)
        results: dict[str, dict[str, Any]] = {}
        clock = Clock()
        total = len(names)
        top: list[Candidate] = []

        def emit() -> None:
            rows = _ordered(cands, top, results)
            progress.document({**head, "complete": False, "candidates": rows})

        def run_one(c: Candidate, runner: Runner | None = None) -> None:
            index = len(results) + 1
            if c.name in prior:
                results[c.name] = prior[c.name]
                remaining = sum(1 for n in names if n not in results and n not in prior)
                progress.finish(
                    Step(index, total, c.name, None, clock.eta(remaining), results[c.name], True)
                )
                emit()
                return
            progress.start(index, total, c.name, units(cfg))
            t0 = time.perf_counter()
            planned: list[int] = []
            if runner is None:
                runner, patcher = loaded.post()
                if c.kind in ("restore", "pro"):
                    plan = plans.get(c.name) or plan_candidate(c, pre, post, plan_settings)
                    patcher.apply(plan, plan_values(plan, pre, post))
                    planned = plan.layers
                else:
                    patcher.reset()
            progress.advance(1)
            res = {**c.to_json(), "planned_layers": planned}
            res.update(measure(runner, cfg, loaded.tokenizer, progress.advance))
            seconds = time.perf_counter() - t0
            res["seconds"] = round(seconds, 3)
            clock.add(seconds)
            results[c.name] = res
            remaining = sum(1 for n in names if n not in results and n not in prior)
            progress.finish(Step(index, total, c.name, seconds, clock.eta(remaining), res))
            emit()

        for c in cands:
            if c.kind != "pre":
                run_one(c)
        if "top-k" in cfg.groups:
            top = top_k_candidates(rank_single_layers(list(results.values())), cfg.top_k)
            for c in top:
                run_one(c)
        loaded.close()
        for c in cands:
            if c.kind == "pre":
                run_one(c, None if c.name in prior else loaded.pre(pre_dir))
    return {
        **head,
        "complete": True,
        "candidates": _ordered(cands, top, results),
        "seconds": round(time.perf_counter() - t_start, 3),
    }


def _header(
    cfg: SweepConfig,
    pre_dir: Path,
    post: str,
    layers: list[int],
    settings: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "pre": str(pre_dir),
        "post": post,
        "layers": layers,
        "device": str(cfg.device),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "autocast": bool(cfg.autocast and cfg.device.type == "cuda"),
        "recall_source": (
            "recall-file" if cfg.recall_items is not None else "niah" if cfg.niah else None
        ),
        "niah": niah_doc(cfg.niah) if cfg.recall_items is None else None,
        "reasoning_metric": cfg.reasoning_metric if cfg.reasoning_items is not None else None,
        "lm_eval_tasks": list(cfg.lm_eval.tasks) if cfg.lm_eval else None,
        "settings": settings if settings is not None else sweep_settings(cfg, pre_dir, post),
    }


def _ordered(
    cands: Sequence[Candidate], top: Sequence[Candidate], results: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Result rows in report order: the top-k candidates right after the single-layer ones."""
    cut = _after_single(cands)
    return [results[c.name] for c in [*cands[:cut], *top, *cands[cut:]] if c.name in results]


def _after_single(cands: Sequence[Candidate]) -> int:
    """Where the top-k candidates go in the report: right after the single-layer ones."""
    idx = [i for i, c in enumerate(cands) if c.group in ("pre", "post", "restore", "single")]
    return (max(idx) + 1) if idx else 0


# -- deciding: the Pareto front, whether the probe decides, the pick, the recipe -------------------


def probe_verdict(
    rows: Sequence[dict[str, Any]], metric: str = "recall", reasoning_metric: str | None = None
) -> Verdict:
    """Whether the candidates' ``metric`` can rank them: not when PRE's recall is at chance (the
    probe does not measure this model's recall at all) nor when every candidate is tied within
    the 95 % intervals. Metrics that are not exact-match proportions always decide."""
    points = [binomial(r, metric, reasoning_metric) for r in rows]
    if not any(points):
        return Verdict(True)
    what = "recall" if metric.startswith("recall") else "exact match"
    refs = [("PRE", p) for r, p in zip(rows, points) if r.get("kind") == "pre" and p]
    if not metric.startswith("recall"):
        refs = []
    return verdict([p for p in points if p], "score", "ci", "n", refs, what)


def finish_sweep(
    doc: dict[str, Any], rule: PickRule, post_is_adapter: bool = False
) -> tuple[Candidate | None, dict[str, Any]]:
    """Add the Pareto front, the probe's verdict and the pick to a complete sweep document; the
    picked candidate (None for a checkpoint as it is, or none)."""
    rows = doc["candidates"]
    flags = pareto_front([(r.get("recall_mean"), r.get("reasoning_score")) for r in rows])
    for r, f in zip(rows, flags):
        r["pareto"] = f
    doc["probe"] = probe_verdict(rows).to_json()
    idx = choose(rule, rows)
    pick_verdict = probe_verdict(rows, rule.metric, doc.get("reasoning_metric"))
    pick: dict[str, Any] = {
        "rule": rule.text,
        "name": rows[idx]["name"] if idx is not None else None,
        "decided": idx is not None and pick_verdict.decides,
        "undecided_because": list(pick_verdict.reasons),
    }
    doc["pick"] = pick
    if post_is_adapter:
        doc["post_is_adapter"] = True
    return (candidate_from_json(rows[idx]) if idx is not None else None), pick


def recipe_refusal(
    doc: dict[str, Any], cand: Candidate | None, force: bool
) -> QKRestoreError | None:
    """Why no recipe may be written for the pick (None: it may)."""
    pick = doc["pick"]
    if cand is None:
        return QKRestoreError(
            f"--pick {pick['rule']!r}: no candidate meets the rule, so no recipe was written",
            hint="loosen the rule (see the table)",
        )
    # the probe's doubt comes first: it is what makes any pick, PRE or POST too, meaningless
    if not pick["decided"] and not force:
        return QKRestoreError(
            f"--write-recipe: the probe cannot decide ({'; '.join(pick['undecided_because'])}), "
            "so no recipe was written",
            hint="measure with more samples or other lengths, or add --force to write it anyway",
        )
    if cand.kind not in ("restore", "pro"):
        return PlanError(
            f"the picked candidate '{cand.name}' is a checkpoint as it is: there is no "
            "restore recipe to write",
            hint="use that checkpoint directly, or pick among restore/pro candidates",
        )
    return None


def pick_recipe(doc: dict[str, Any], cand: Candidate, include_sliding: bool, why: str) -> str:
    row = next(r for r in doc["candidates"] if r["name"] == cand.name)
    return recipe_text(
        cand, row["planned_layers"], include_sliding, why, bool(doc.get("post_is_adapter"))
    )


@contextlib.contextmanager
def merged_post(adapter: Path, pre: Path, note: Callable[[str], None]) -> Iterator[Path]:
    """POST = PRE + the adapter merged whole, as a temporary checkpoint for the sweep to load.

    Candidates are then planned on PRE and that POST exactly as for full checkpoints, and a
    recipe written from the sweep applies to the adapter itself (``merge`` takes adapters).
    """
    from ..adapter import write_merged_post

    with tempfile.TemporaryDirectory(prefix="qkrestore-sweep-post-") as tmp:
        note(f"POST is a PEFT adapter: sweeping PRE + adapter, merged into {tmp}")
        yield write_merged_post(pre, adapter, Path(tmp) / "post")


@dataclass(frozen=True)
class Outputs:
    """Where a run's results go besides the returned document."""

    write_recipe: Path | None = None
    force: bool = False
    plot: Path | None = None
    json_out: Path | None = None  # rewritten after every candidate
    resume: Path | None = None  # skip the candidates this file holds (same settings)
    command: str = "qkrestore sweep"  # named in the recipe's comment

    def results_file(self) -> Path | None:
        return self.json_out or self.resume


def sweep_job(
    pre: Path | str,
    post: Path | str,
    cfg: SweepConfig,
    pick: str | None,
    outputs: Outputs,
    progress: Progress | None = None,
    note: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, Any], QKRestoreError | None]:
    """The whole ``sweep`` command: check, measure (resuming, saving as it goes), decide, write the
    recipe and plot. Returns the ``--json`` document, and why no recipe was written where one was
    asked for (the caller raises it after showing the table)."""
    pre_dir = folder(pre, "PRE")
    adapter = is_adapter_source(post)  # POST = PRE + adapter: PRE's config describes it
    post_dir = pre_dir if adapter else folder(post, "POST")
    rule = parse_pick(pick or default_pick(cfg.reasoning_metric))
    if outputs.plot is not None:
        from ..io.plots import check_target

        check_target(outputs.plot)
    results_file = outputs.results_file()
    if results_file is not None:
        check_writable(results_file)
    settings = sweep_settings(cfg, pre_dir, post)
    old = load_resume(outputs.resume, settings) if outputs.resume is not None else {}
    done = [r for r in old.get("candidates") or [] if isinstance(r, dict) and "name" in r]
    saving = Saving(progress or Progress(), results_file)
    merged = merged_post(Path(post), pre_dir, note) if adapter else contextlib.nullcontext(post_dir)
    refs = [c.bound.ref for c in rule.conditions if c.bound.ref is not None]
    with merged as run_post:
        doc = run_sweep(
            pre_dir, run_post, cfg, saving, refs, done=done, post_label=str(post), settings=settings
        )
    cand, pick_doc = finish_sweep(doc, rule, adapter)
    refusal = None
    if outputs.write_recipe is not None:
        refusal = recipe_refusal(doc, cand, outputs.force)
        if refusal is None and cand is not None:
            why = f"candidate '{cand.name}' picked by: {outputs.command}"
            if not pick_doc["decided"]:
                why += " (written with --force although the probe cannot decide)"
            text = pick_recipe(doc, cand, cfg.include_sliding, why)
            write_recipe(outputs.write_recipe, text)
            pick_doc["recipe"] = str(outputs.write_recipe)
    if outputs.plot is not None:
        from ..io.plots import sweep_figure

        sweep_figure(doc, outputs.plot)
        doc["plot"] = str(outputs.plot)
    if results_file is not None:
        write_json_atomic(results_file, doc)
    return doc, refusal
