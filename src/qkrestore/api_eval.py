"""The Python API of the measuring commands: ``sweep``, ``select-layers``, the diagnostics,
``push``, and ``inspect-layers`` for PEFT adapters.

    import qkrestore

    result = qkrestore.sweep("./base", "./sft", lengths=[4096], reasoning="example")
    print(result.pick, result.probe)           # the rule's pick, and whether the probe decides
    layers = qkrestore.select_layers("./base", lengths=[4096], top=4)
    print(layers.top)

Each function takes the command's options as keyword arguments (the flags' names with
underscores), runs the same library code as the command, and returns a typed result whose
``to_json()`` is exactly the document ``--json`` prints; the CLI commands call these functions.
Bad input raises a :class:`~qkrestore.errors.QKRestoreError` subclass; nothing here prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PlanError, QKRestoreError
from .evaluate.runlog import Progress
from .surgery.inspect import LayerReport

# the sweep's candidate groups, in report order (qkrestore.sweep.GROUPS; not imported here so that
# ``import qkrestore`` does not import torch)
GROUPS = ("pre", "post", "restore", "single", "top-k", "ablations", "pro", "cross-gram")
PathLike = str | os.PathLike[str]
Layers = str | Sequence[int] | None


def json_safe(value: Any) -> Any:
    """The document with every non-finite float as None (strict JSON, as ``--json`` prints)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class Document:
    """A command's result: the ``--json`` document, with typed views in the subclasses."""

    doc: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return json_safe(self.doc)  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> Any:
        return self.doc[key]


class SweepResult(Document):
    """``sweep``: every candidate's scores, the Pareto front, the probe's verdict and the pick."""

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return list(self.doc["candidates"])

    @property
    def pick(self) -> dict[str, Any]:
        return dict(self.doc["pick"])

    @property
    def probe(self) -> dict[str, Any]:
        """``{"decides": bool, "reasons": [...]}`` for the recall probe."""
        return dict(self.doc["probe"])


class SelectLayersResult(Document):
    """``select-layers``: layers ranked by the retrieval their W_Q ablation costs."""

    @property
    def ranking(self) -> list[dict[str, Any]]:
        return list(self.doc["ranking"])

    @property
    def top(self) -> list[int] | None:
        return self.doc.get("top")

    @property
    def probe(self) -> dict[str, Any]:
        return dict(self.doc["probe"])


class DriftResult(Document):
    """``drift``: Q/K/V/O and routing-form drift per layer and head."""

    @property
    def notes(self) -> list[str]:
        return list(self.doc.get("notes", []))


class AttnDistanceResult(Document):
    """``attn-distance``: D_h per head of every model, fell/rose counts per consecutive pair."""


class AutocorrResult(Document):
    """``autocorr``: ρ(d) of a corpus and its exponential fit."""

    @property
    def tau(self) -> float | None:
        return self.doc.get("tau")


class AttnLocalityResult(Document):
    """``attn-locality``: local mass and needle weight per softmax layer and head, per model."""

    @property
    def notes(self) -> list[str]:
        return list(self.doc.get("notes", []))


class NiahResult(Document):
    """``niah``: exact-match accuracy per length."""


class PushResult(Document):
    """``push``: where the output went."""

    @property
    def url(self) -> str:
        return str(self.doc["url"])


class AdapterLayerReport(Document):
    """``inspect-layers ADAPTER``: the adapter's modules and what QK-Restore does to each."""


class RecipeNotWritten(PlanError):
    """A recipe was asked for and not written (no pick, a checkpoint picked, or a probe that
    cannot decide); ``result`` holds everything that was measured."""

    def __init__(self, reason: QKRestoreError, result: Document) -> None:
        super().__init__(reason.message, hint=reason.hint)
        self.result = result


def _path(p: PathLike | None) -> Path | None:
    return None if p is None else Path(p)


def _layers(layers: Layers) -> list[int] | None:
    from .surgery.plan import parse_layers

    if layers is None:
        return None
    if isinstance(layers, str):
        return parse_layers(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise PlanError(f"layers {list(layers)!r}: give 0-based layer indices")
    return sorted(set(layers))


def sweep(
    pre: PathLike,
    post: PathLike,
    *,
    layers: Layers = None,
    include_sliding: bool = False,
    allow_arch_mismatch: bool = False,
    candidates: str | Sequence[str] = GROUPS,
    ridges: str | Sequence[float] = (0.1, 1.0, 10.0),
    fix: str | Sequence[str] = ("key", "query"),
    top_k: str | Sequence[int] = (2, 4),
    lengths: str | Sequence[int] = (4096, 8192),
    task: str = "single-2",
    samples: int = 10,
    seed: int = 0,
    recall: PathLike | None = None,
    reasoning: PathLike | None = None,
    reasoning_metric: str = "exact",
    lm_eval: str | Sequence[str] | None = None,
    lm_eval_max_length: int | None = None,
    lm_eval_limit: float | None = None,
    lm_eval_include: PathLike | None = None,
    lm_eval_metric: str | None = None,
    pick: str | None = None,
    write_recipe: PathLike | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    autocast: bool = True,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    scoring: str = "forced",
    beyond_context: bool = False,
    device_map: str | None = None,
    plot: PathLike | None = None,
    json_out: PathLike | None = None,
    resume: PathLike | None = None,
    progress: Progress | None = None,
    on_note: Callable[[str], None] | None = None,
    command: str = "qkrestore.sweep",
) -> SweepResult:
    """Measure what each way of restoring buys and costs (``qkrestore sweep``).

    ``json_out`` is rewritten after every candidate; ``resume`` skips the candidates a file of the
    same settings holds (and keeps writing to it). ``progress`` (a :class:`qkrestore.evaluate.runlog.
    Progress`) gets per-candidate events with an ETA. A recipe asked for with ``write_recipe``
    that cannot be written raises :class:`RecipeNotWritten`, whose ``result`` holds the sweep.
    """
    from .evaluate.measuring import float_list, measurement, word_list
    from .evaluate.measuring import int_list as ints
    from .evaluate.sweep import Outputs, SweepConfig, sweep_job

    if reasoning_metric not in ("exact", "loglik"):
        raise QKRestoreError(f"--reasoning-metric {reasoning_metric!r}: use exact or loglik")
    groups = word_list(candidates, "--candidates", GROUPS)
    fixes = word_list(fix, "--fix", ("key", "query"))
    pre_p, post_p = Path(pre), Path(post)
    from .adapter import is_adapter_source

    model_dir = pre_p if is_adapter_source(post_p) else post_p
    m = measurement(
        model_dir,
        lengths=lengths,
        task=task,
        samples=samples,
        seed=seed,
        recall=_path(recall),
        reasoning=None if reasoning is None else os.fspath(reasoning),
        lm_eval=lm_eval,
        lm_eval_max_length=lm_eval_max_length,
        lm_eval_limit=lm_eval_limit,
        lm_eval_include=_path(lm_eval_include),
        lm_eval_metric=lm_eval_metric,
        device=device,
        dtype=dtype,
        autocast=autocast,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        scoring=scoring,
        beyond_context=beyond_context,
        device_map=device_map,
    )
    cfg = SweepConfig(
        layers=_layers(layers),
        include_sliding=include_sliding,
        allow_arch_mismatch=allow_arch_mismatch,
        groups=groups,
        ridges=float_list(ridges, "--ridges"),
        fixes=fixes,
        top_k=ints(top_k, "--top-k", 1),
        reasoning_metric=reasoning_metric,
        **m.fields(),
    )
    outputs = Outputs(
        write_recipe=_path(write_recipe),
        force=force,
        plot=_path(plot),
        json_out=_path(json_out),
        resume=_path(resume),
        command=command,
    )
    doc, refusal = sweep_job(
        pre_p, post_p, cfg, pick, outputs, progress, on_note or (lambda message: None)
    )
    result = SweepResult(doc)
    if refusal is not None:
        raise RecipeNotWritten(refusal, result)
    return result


def select_layers(
    model: PathLike,
    *,
    layers: Layers = None,
    global_only: bool = False,
    lengths: str | Sequence[int] = (4096, 8192),
    task: str = "single-2",
    samples: int = 10,
    seed: int = 0,
    recall: PathLike | None = None,
    lm_eval: str | Sequence[str] | None = None,
    lm_eval_max_length: int | None = None,
    lm_eval_limit: float | None = None,
    lm_eval_include: PathLike | None = None,
    lm_eval_metric: str | None = None,
    top: int | None = None,
    write_recipe: PathLike | None = None,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    autocast: bool = True,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    scoring: str = "forced",
    beyond_context: bool = False,
    device_map: str | None = None,
    json_out: PathLike | None = None,
    resume: PathLike | None = None,
    progress: Progress | None = None,
    command: str = "qkrestore.select_layers",
) -> SelectLayersResult:
    """Rank softmax layers by the retrieval lost when their W_Q is zeroed (``select-layers``).

    Retrieval is measured exactly as ``sweep`` measures recall. ``top`` with ``write_recipe``
    writes a ``merge`` recipe; when it cannot be written, :class:`RecipeNotWritten` carries the
    ranking.
    """
    from .evaluate.measuring import measurement
    from .evaluate.select_layers import SelectConfig, select_layers_job

    if top is not None and top < 1:
        raise QKRestoreError(f"--top {top}: give at least 1")
    m = measurement(
        Path(model),
        lengths=lengths,
        task=task,
        samples=samples,
        seed=seed,
        recall=_path(recall),
        lm_eval=lm_eval,
        lm_eval_max_length=lm_eval_max_length,
        lm_eval_limit=lm_eval_limit,
        lm_eval_include=_path(lm_eval_include),
        lm_eval_metric=lm_eval_metric,
        device=device,
        dtype=dtype,
        autocast=autocast,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        scoring=scoring,
        beyond_context=beyond_context,
        device_map=device_map,
    )
    cfg = SelectConfig(layers=_layers(layers), include_sliding=not global_only, measurement=m)
    doc, refusal = select_layers_job(
        Path(model),
        cfg,
        top=top,
        write_recipe_to=_path(write_recipe),
        force=force,
        json_out=_path(json_out),
        resume=_path(resume),
        command=command,
        progress=progress,
    )
    result = SelectLayersResult(doc)
    if refusal is not None:
        raise RecipeNotWritten(refusal, result)
    return result


def drift(
    pre: PathLike, post: PathLike, *, all_layers: bool = False, plot: PathLike | None = None
) -> DriftResult:
    """Weight drift PRE → POST (``qkrestore drift``): weights only, no model run."""
    from .diagnostics.drift import drift_report
    from .job import open_side

    if plot is not None:
        from .io import plots

        plots.check_target(Path(plot))
    with open_side(os.fspath(pre), "PRE") as a, open_side(os.fspath(post), "POST") as b:
        report = drift_report(a, b, all_layers=all_layers)
    if plot is not None:
        plots.drift_figure(report, Path(plot))
        report["plot"] = str(plot)
    return DriftResult(report)


def attn_distance(
    *models: PathLike,
    length: int = 8192,
    depth: float = 0.5,
    device: str = "auto",
    dtype: str = "auto",
    layer: int | None = None,
    head: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    plot: PathLike | None = None,
    on_note: Callable[[str], None] | None = None,
    on_model: Callable[[str], None] | None = None,
) -> AttnDistanceResult:
    """Mean attention distance D_h per head on a synthetic needle prompt (``attn-distance``)."""
    from .diagnostics.attention import attn_distance as run

    report = run(
        [Path(m) for m in models],
        length=length,
        depth=depth,
        device=device,
        dtype=dtype,
        layer=layer,
        head=head,
        seed=seed,
        trust_remote_code=trust_remote_code,
        plot=_path(plot),
        note=on_note or (lambda message: None),
        on_model=on_model or (lambda message: None),
    )
    return AttnDistanceResult(report)


def autocorr(
    input_path: PathLike,
    *,
    tokenizer: PathLike | None = None,
    max_distance: int = 128,
    input_kind: str = "auto",
    plot: PathLike | None = None,
) -> AutocorrResult:
    """Token autocorrelation ρ(d) of a corpus and its decay length τ (``autocorr``)."""
    from .diagnostics.autocorr import autocorr_report, load_documents

    if input_kind not in ("auto", "ids", "text"):
        raise QKRestoreError(f"--input-kind {input_kind!r}: use auto, ids or text")
    if max_distance < 2:
        raise QKRestoreError(f"--max-distance {max_distance}: give at least 2")
    if plot is not None:
        from .io import plots

        plots.check_target(Path(plot))
    docs = load_documents(Path(input_path), _path(tokenizer), input_kind)
    report = autocorr_report(docs, max_distance)
    report["input"] = os.fspath(input_path)
    if plot is not None:
        plots.autocorr_figure(report, Path(plot))
        report["plot"] = str(plot)
    return AutocorrResult(report)


def niah(
    model: PathLike,
    *,
    lengths: str | Sequence[int] = (4096, 8192),
    task: str = "single-2",
    samples: int = 10,
    depth: float | None = None,
    max_new_tokens: int | None = None,
    chat_template: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    scoring: str = "forced",
    beyond_context: bool = False,
    device_map: str | None = None,
) -> NiahResult:
    """A RULER-style needle-in-a-haystack probe: exact-match accuracy per length (``niah``)."""
    from .evaluate.niah_run import run_niah
    from .io.runtime import choose_device

    if isinstance(lengths, str):
        try:
            lens = [int(x) for x in lengths.split(",") if x.strip()]
        except ValueError:
            raise QKRestoreError(f"--lengths {lengths!r}: give integers, e.g. 4096,8192") from None
    else:
        lens = [int(x) for x in lengths]
    if not lens:
        raise QKRestoreError(f"--lengths {lengths!r}: give lengths of at least 64 tokens")
    if task not in ("single-1", "single-2", "single-3"):
        raise QKRestoreError(f"--task {task!r}: use single-1, single-2 or single-3")
    if samples < 1:
        raise QKRestoreError(f"--samples {samples}: give at least 1")
    if not Path(model).is_dir():
        raise QKRestoreError(f"{model}: not a model folder")
    dev, dt = choose_device(device, dtype)
    report = run_niah(
        Path(model),
        lens,
        task,
        samples,
        dev,
        dt,
        depth=depth,
        max_new_tokens=max_new_tokens,
        use_chat_template=chat_template,
        seed=seed,
        trust_remote_code=trust_remote_code,
        scoring=scoring,
        beyond_context=beyond_context,
        device_map=device_map,
    )
    return NiahResult(report)


def push(
    output: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    pre: PathLike | None = None,
    post: PathLike | None = None,
) -> PushResult:
    """Verify an output made earlier, then upload it to the Hugging Face Hub (``qkrestore push``);
    ``pre``/``post`` say where the sources are now when they have moved since OUT was written."""
    from .io.hub import push_folder
    from .io.sourcefiles import folder_files
    from .job import verify_for_push
    from .surgery.verification import read_provenance

    out = Path(output)
    record = read_provenance(out)
    # Everything upload_folder would send must be a regular file of OUT: a link leading out of it
    # (notes.txt -> ~/.ssh/id_rsa) or a FIFO added since it was written is refused before any
    # network call.
    folder_files(out)
    method = record.get("plan", {}).get("method", "qk-restore")
    url = push_folder(
        out,
        repo_id,
        private=private,
        revision=revision,
        message=f"{method} with qkrestore",
        check=lambda folder: verify_for_push(folder, _path(pre), _path(post)),
    )
    return PushResult({"ok": True, "repo_id": repo_id, "revision": revision, "url": url})


def inspect_layers(
    model: PathLike,
    *,
    compare_with: PathLike | None = None,
    weights: str | None = None,
    base: PathLike | None = None,
) -> LayerReport | AdapterLayerReport:
    """Which layers of ``model`` are softmax attention and where their Q/K tensors are.

    ``model`` may be a PEFT adapter: the result then lists its modules and what QK-Restore does
    to each, planned against ``base`` (default: the base the adapter names, when that is a local
    folder). ``compare_with`` gives the relative Q/K drift per layer (checkpoints only).
    """
    from . import api
    from .adapter import inspect_adapter, is_adapter_source
    from .adapter.config import read_adapter_config

    if is_adapter_source(Path(model)):
        if compare_with is not None or weights is not None:
            raise PlanError(
                f"{model} is a PEFT adapter: compare_with and weights need a checkpoint"
            )
        base_dir = _path(base)
        named = read_adapter_config(Path(model)).base_model
        if base_dir is None and named and Path(named).is_dir():
            base_dir = Path(named)  # the adapter names a local base: plan against it
        return AdapterLayerReport(inspect_adapter(Path(model), base_dir))
    if base is not None:
        raise PlanError(f"--base: {model} is not a PEFT adapter folder")
    return api.inspect_layers(model, compare_with=compare_with, weights=weights)


__all__ = [
    "AdapterLayerReport",
    "AttnDistanceResult",
    "AutocorrResult",
    "Document",
    "DriftResult",
    "NiahResult",
    "PushResult",
    "RecipeNotWritten",
    "SelectLayersResult",
    "SweepResult",
    "attn_distance",
    "autocorr",
    "drift",
    "inspect_layers",
    "niah",
    "push",
    "select_layers",
    "sweep",
]


def attn_locality(
    models: Sequence[PathLike],
    *,
    length: int = 2048,
    samples: int = 4,
    text: PathLike | None = None,
    last_k: int = 64,
    task: str = "single-2",
    chat_template: bool = False,
    tokenizer: PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    plot: PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> AttnLocalityResult:
    """Per softmax layer and head, the attention weight on the last ``last_k`` tokens and from the
    question onto the needle, on the same real prompts for every model (``attn-locality``): NIAH
    prompts by default, or windows of ``text``."""
    from .diagnostics import locality as lc
    from .io.runtime import choose_device, load_tokenizer

    if not models:
        raise QKRestoreError("attn-locality: give at least one model folder")
    if length < 64 or samples < 1 or last_k < 1:
        raise QKRestoreError(
            f"length {length}, samples {samples}, last_k {last_k}: give length ≥ 64, samples ≥ 1 "
            "and last_k ≥ 1"
        )
    if plot is not None:
        from .io import plots

        plots.check_target(Path(plot))
    for m in models:
        if not Path(m).is_dir():
            raise QKRestoreError(f"{m}: not a model folder")
    if text is not None and chat_template:
        raise QKRestoreError("chat_template applies to NIAH prompts, not to a text file")
    tok = load_tokenizer(Path(tokenizer or models[0]), what="attn-locality")
    if text is not None:
        prompts = lc.text_prompts(tok, Path(text), length, samples)
        source = f"text:{text}"
    else:
        prompts = lc.niah_prompts(
            tok, length, samples, task=task, seed=seed, use_chat_template=chat_template
        )
        source = f"niah:{task}"
    dev, _ = choose_device(device, "float32")
    report = lc.locality_report(
        [Path(m) for m in models],
        prompts,
        source,
        last_k,
        dev,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    if text is not None and len(prompts) < samples:
        report.notes.append(f"{text}: only {len(prompts)} windows of {length} tokens")
    if plot is not None:
        lc.locality_figure(report, Path(plot), [Path(m).name for m in models])
    doc = report.to_json()
    if plot is not None:
        doc["plot"] = str(plot)
    return AttnLocalityResult(doc)
