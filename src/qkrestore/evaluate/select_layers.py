"""``qkrestore select-layers``: which softmax layers carry retrieval (the paper's Appendix M).

Why: in a model with many softmax-attention layers (pure-softmax models, or hybrids with many),
restoring all of them brings back more of the fine-tune's loss than needed. Appendix M scores each
layer by ablation: set the layer's W_Q to zero, so its attention becomes uniform and can no longer
look anything up, and measure how much retrieval falls. Layers whose ablation hurts most are the
ones worth restoring.

The ablated rows are exactly the query rows the planner names for the layer (only the query rows
of gated or fused tensors), zeroed in one loaded model and put back before the next layer; no
checkpoint is written. Retrieval is measured as ``sweep`` measures recall
(:func:`qkrestore.evaluate.measuring.measurement`), each measurement is saved as it finishes, and a run can be
resumed from that file (:mod:`qkrestore.evaluate.runlog`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import PlanError, QKRestoreError
from ..families import layer_map
from ..io.checkpoint import Checkpoint
from ..surgery.plan import PlanOptions, build_plan, choose_layers
from .candidates import ModelPatcher, ablation_values
from .measuring import Measurement, binomial, folder, measure, measure_settings, needs_tok
from .probe import Verdict, verdict
from .runlog import Clock, Progress, Saving, Step, check_writable, load_resume, write_json_atomic
from .runner import Runner, load_model, load_tokenizer
from .sweep import write_recipe

UNABLATED = "unablated"


@dataclass(frozen=True)
class SelectConfig:
    """``select-layers``' options, parsed: which layers, and how retrieval is measured."""

    layers: list[int] | None = None
    include_sliding: bool = True
    measurement: Measurement = field(default_factory=Measurement)


def retrieval(measured: dict[str, Any]) -> float | None:
    """The one retrieval number a layer is scored with: mean recall, else the lm-eval score."""
    if measured.get("recall_mean") is not None:
        return measured["recall_mean"]
    return measured.get("lm_eval_score")


def rank(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers by the drop their ablation causes, largest first (ties: lower layer first)."""
    return sorted(rows, key=lambda r: (-(r["drop"] if r["drop"] is not None else -1e9), r["layer"]))


def select_settings(model_dir: Path, cfg: SelectConfig) -> dict[str, Any]:
    """Everything that decides select-layers' numbers (a resume file must match them)."""
    return {
        "command": "select-layers",
        "model": str(Path(model_dir).resolve()),
        "layers": cfg.layers,
        "include_sliding": cfg.include_sliding,
        **measure_settings(cfg.measurement),
    }


def _retrieval_source(m: Measurement) -> str:
    return "recall-file" if m.recall_items is not None else "niah" if m.niah else "lm-eval"


def run_select_layers(
    model_dir: Path,
    cfg: SelectConfig,
    progress: Progress | None = None,
    *,
    done: dict[str, dict[str, Any]] | None = None,
    top: int | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the unablated model, then each layer with its W_Q zeroed; the JSON document.

    ``done`` maps ``unablated`` / ``layer N`` to measurements of an earlier run with the same
    settings (not measured again); ``progress.document`` gets the document after every one.
    """
    progress = progress or Progress()
    prior = dict(done or {})
    m = cfg.measurement
    t0 = time.perf_counter()
    with Checkpoint.open(model_dir) as ck:
        lmap = layer_map(ck.config, ck.tensors)
        model_type, kinds = lmap.model_type, lmap.kinds
        layers = choose_layers(kinds, cfg.layers, cfg.include_sliding)
        if top is not None and top > len(layers):
            raise QKRestoreError(f"--top {top}: the model has only {len(layers)} scored layers")
        plans = {i: build_plan(ck, ck, PlanOptions(layers=[i], targets=("q",))) for i in layers}
        for i, plan in plans.items():
            if not ablation_values(plan):
                raise PlanError(f"layer {i}: the plan names no query weight to ablate")
        head = {
            "model": str(model_dir),
            "model_type": model_type,
            "layers": layers,
            "device": str(m.device),
            "dtype": str(m.dtype).removeprefix("torch."),
            "retrieval": _retrieval_source(m),
            "settings": settings if settings is not None else select_settings(model_dir, cfg),
        }
        names = [UNABLATED, *(f"layer {i}" for i in layers)]
        measured: dict[str, dict[str, Any]] = {}
        state: dict[str, Any] = {}
        clock = Clock()

        def loaded() -> tuple[Runner, ModelPatcher, Any]:
            if not state:
                tok = load_tokenizer(model_dir) if needs_tok(m) else None
                model = load_model(model_dir, m.device, m.dtype, m.trust_remote_code, m.device_map)
                state["runner"] = Runner.from_settings(model, tok, m, str(model_dir))
                state["patcher"], state["tok"] = ModelPatcher(model), tok
            return state["runner"], state["patcher"], state["tok"]

        def emit() -> None:
            progress.document({**head, "complete": False, **_rows(measured, layers, kinds)})

        for index, name in enumerate(names, 1):
            if name in prior:
                measured[name] = prior[name]
                remaining = sum(1 for n in names if n not in measured and n not in prior)
                progress.finish(
                    Step(index, len(names), name, None, clock.eta(remaining), prior[name], True)
                )
                emit()
                continue
            progress.start(index, len(names), name, _units(m))
            start = time.perf_counter()
            runner, patcher, tok = loaded()
            if name == UNABLATED:
                patcher.reset()
            else:
                plan = plans[int(name.split()[1])]
                patcher.apply(plan, ablation_values(plan))
            measured[name] = measure(runner, m, tok, progress.advance)
            seconds = time.perf_counter() - start
            clock.add(seconds)
            measured[name]["seconds"] = round(seconds, 3)
            remaining = sum(1 for n in names if n not in measured and n not in prior)
            progress.finish(
                Step(index, len(names), name, seconds, clock.eta(remaining), measured[name])
            )
            emit()
        if state:
            state["patcher"].reset()
    doc = {**head, "complete": True, **_rows(measured, layers, kinds)}
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    return doc


def _rows(measured: dict[str, dict[str, Any]], layers: Sequence[int], kinds: Any) -> dict[str, Any]:
    """``unablated``, its score, and the layers measured so far, ranked by drop."""
    base = measured.get(UNABLATED)
    base_score = retrieval(base) if base is not None else None
    rows = []
    for i in layers:
        got = measured.get(f"layer {i}")
        if got is None:
            continue
        score = retrieval(got)
        drop = None if score is None or base_score is None else base_score - score
        rows.append({"layer": i, "kind": kinds[i].value, "drop": drop, **got})
    ranked = rank(rows)
    for pos, r in enumerate(ranked, 1):
        r["rank"] = pos
    return {"unablated": base, "unablated_score": base_score, "ranking": ranked}


def _units(m: Measurement) -> int:
    n = 0
    if m.recall_items is not None:
        n += len(m.recall_items)
    elif m.niah is not None:
        n += len(m.niah.lengths) * m.niah.samples
    return n + (1 if m.lm_eval is not None else 0)


def probe_verdict(doc: dict[str, Any]) -> Verdict:
    """Whether the ablations can rank layers: not when the unablated model's recall is at chance
    (no layer has anything to lose), nor when every measurement is tied within its 95 %
    interval. An lm-eval score (not an exact-match proportion) always decides."""
    base = doc.get("unablated") or {}
    points = [binomial(r, "recall", None) for r in [base, *doc["ranking"]]]
    if not all(points):
        return Verdict(True)
    return verdict(points, "score", "ci", "n", [("the unablated model", points[0])], "recall")


def select_recipe(model: Path, top: list[int], command: str) -> str:
    """A ``merge --config`` recipe restoring the chosen layers (sorted), with the command that
    chose them as a comment."""
    keys = {"layers": sorted(top), "targets": ["q", "k"]}
    head = (
        f"# layers chosen by: {command}\n"
        f"# (the {len(top)} layers of {model} whose W_Q ablation cost most retrieval)\n"
        "# use: qkrestore merge PRE POST -o OUT --config THIS_FILE\n"
    )
    return head + yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)


def _measured_in(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The measurements a results file holds, by name (``unablated``, ``layer N``)."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(doc.get("unablated"), dict):
        out[UNABLATED] = doc["unablated"]
    for r in doc.get("ranking") or []:
        if isinstance(r, dict) and isinstance(r.get("layer"), int):
            keep = {k: v for k, v in r.items() if k not in ("layer", "kind", "drop", "rank")}
            out[f"layer {r['layer']}"] = keep
    return out


def select_layers_job(
    model: Path | str,
    cfg: SelectConfig,
    *,
    top: int | None = None,
    write_recipe_to: Path | None = None,
    force: bool = False,
    json_out: Path | None = None,
    resume: Path | None = None,
    command: str = "qkrestore select-layers",
    progress: Progress | None = None,
) -> tuple[dict[str, Any], QKRestoreError | None]:
    """The whole ``select-layers`` command: measure (resuming, saving as it goes), rank, decide
    whether the probe can tell, write the recipe. Returns the document and why no recipe was
    written where one was asked for (the caller raises it after showing the table)."""
    model_dir = folder(model, "MODEL")
    if write_recipe_to is not None and top is None:
        raise QKRestoreError("--write-recipe needs --top K (how many layers to keep)")
    results_file = json_out or resume
    if results_file is not None:
        check_writable(results_file)
    settings = select_settings(model_dir, cfg)
    done = _measured_in(load_resume(resume, settings)) if resume is not None else {}
    doc = run_select_layers(
        model_dir,
        cfg,
        Saving(progress or Progress(), results_file),
        done=done,
        top=top,
        settings=settings,
    )
    probe = probe_verdict(doc)
    doc["probe"] = probe.to_json()
    refusal = None
    if top is not None:
        doc["top"] = sorted(r["layer"] for r in doc["ranking"][:top])
        if write_recipe_to is not None:
            if not probe.decides and not force:
                refusal = QKRestoreError(
                    f"--write-recipe: the probe cannot decide ({probe.text()}), so no recipe "
                    "was written",
                    hint="measure with more samples or other lengths, or add --force",
                )
            else:
                write_recipe(write_recipe_to, select_recipe(model_dir, doc["top"], command))
                doc["recipe"] = str(write_recipe_to)
    if results_file is not None:
        write_json_atomic(results_file, doc)
    return doc, refusal


__all__ = [
    "SelectConfig",
    "probe_verdict",
    "rank",
    "retrieval",
    "run_select_layers",
    "select_layers_job",
    "select_recipe",
]
