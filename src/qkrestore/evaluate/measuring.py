"""What ``sweep`` and ``select-layers`` measure, and how: one settings builder for both.

Why one module: the two commands must measure recall the same way (the same precedence of the
recall file, lm-eval tasks and the built-in NIAH probe; the same dtype policy as every command that
runs a model; the same batching), so the options are checked and turned into a
:class:`Measurement` here, once, and :func:`measure` scores whatever weights the loaded model holds
with it, attaching each exact-match score's trials and 95 % Wilson interval
(:mod:`qkrestore.evaluate.probe`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import QKRestoreError
from ..io.runtime import choose_device
from .probe import interval
from .runner import (
    Item,
    LmEvalSettings,
    NiahSettings,
    Runner,
    lm_eval_score,
    mean,
    needs_tokenizer,
    recall_by_group,
    run_lm_eval,
    summarise_items,
)


def folder(path: Path | str, label: str) -> Path:
    """A local model folder (the sweep loads the model, so Hub ids must be fetched first)."""
    if not Path(path).is_dir():
        raise QKRestoreError(f"{label} {path}: not a local model folder (sweep loads the model)")
    return Path(path)


@dataclass(frozen=True)
class Measurement:
    """How ``sweep`` and ``select-layers`` measure every candidate: the same settings for both.

    Recall comes from ``--recall FILE`` when given, else from lm-evaluation-harness tasks when
    given (``select-layers`` scores layers with them), else from the built-in NIAH probe; lm-eval
    tasks are scored besides a recall file. Reasoning (sweep only) comes from its own file.
    """

    niah: NiahSettings | None = None
    recall_items: Sequence[Item] | None = None
    reasoning_items: Sequence[Item] | None = None
    lm_eval: LmEvalSettings | None = None
    device: Any = None  # torch.device
    dtype: Any = None  # torch.dtype
    autocast: bool = True
    batch_size: int = 8
    trust_remote_code: bool = False
    device_map: str | None = None  # accelerate's placement ("auto") for models beyond one device

    def fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def int_list(value: str | Sequence[int], option: str, low: int) -> tuple[int, ...]:
    """A comma list (or a sequence) of integers ≥ ``low``."""
    try:
        if isinstance(value, str):
            vals = tuple(int(x) for x in value.split(",") if x.strip())
        else:
            vals = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        raise QKRestoreError(f"{option} {value!r}: give integers, e.g. 2,4") from None
    if not vals or any(v < low for v in vals):
        raise QKRestoreError(f"{option} {value!r}: give integers ≥ {low}")
    return vals


def float_list(value: str | Sequence[float], option: str) -> tuple[float, ...]:
    """A comma list (or a sequence) of finite numbers ≥ 0."""
    try:
        if isinstance(value, str):
            vals = tuple(float(x) for x in value.split(",") if x.strip())
        else:
            vals = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise QKRestoreError(f"{option} {value!r}: give numbers, e.g. 0.1,1,10") from None
    if not vals or any(not (v >= 0 and math.isfinite(v)) for v in vals):
        raise QKRestoreError(f"{option} {value!r}: give finite numbers ≥ 0")
    return vals


def word_list(value: str | Sequence[str], option: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A comma list (or a sequence) of words out of ``allowed``."""
    words = value.split(",") if isinstance(value, str) else list(value)
    vals = tuple(w.strip() for w in words if w.strip())
    if not vals or any(v not in allowed for v in vals):
        raise QKRestoreError(f"{option} {value!r}: use a comma list of {', '.join(allowed)}")
    return vals


def measurement(
    model_dir: Path,
    *,
    lengths: str | Sequence[int] = (4096, 8192),
    task: str = "single-2",
    samples: int = 10,
    seed: int = 0,
    recall: Path | None = None,
    reasoning: Path | str | None = None,
    lm_eval: str | Sequence[str] | None = None,
    lm_eval_max_length: int | None = None,
    lm_eval_limit: float | None = None,
    lm_eval_include: Path | None = None,
    lm_eval_metric: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    autocast: bool = True,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    scoring: str = "forced",
    beyond_context: bool = False,
    device_map: str | None = None,
) -> Measurement:
    """Check every measuring option (and that optional packages are there) before a model is
    loaded; the one :class:`Measurement` both commands use.

    The weights' dtype follows :func:`qkrestore.io.runtime.model_dtype_for`, like every command that
    runs a model: ``auto`` is float32 on the CPU and bfloat16 on CUDA.
    """
    from .runner import example_reasoning_file, load_items, require_lm_eval

    lens = int_list(lengths, "--lengths", 64)
    if task not in ("single-1", "single-2", "single-3"):
        raise QKRestoreError(f"--task {task!r}: use single-1, single-2 or single-3")
    if samples < 1:
        raise QKRestoreError(f"--samples {samples}: give at least 1")
    if batch_size < 1:
        raise QKRestoreError(f"--batch-size {batch_size}: give at least 1")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise QKRestoreError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    recall_items = load_items(Path(recall), "--recall") if recall is not None else None
    reasoning_items = None
    if reasoning is not None:
        path = example_reasoning_file() if str(reasoning) == "example" else Path(reasoning)
        reasoning_items = load_items(path, "--reasoning")
    lm = None
    if lm_eval is not None:
        require_lm_eval()
        words = lm_eval.split(",") if isinstance(lm_eval, str) else list(lm_eval)
        names = tuple(w.strip() for w in words if w.strip())
        if not names:
            raise QKRestoreError(f"--lm-eval {lm_eval!r}: name at least one task")
        if lm_eval_include is not None and not Path(lm_eval_include).is_dir():
            raise QKRestoreError(f"--lm-eval-include {lm_eval_include}: not a folder")
        lm = LmEvalSettings(
            tasks=names,
            tokenizer_path=str(model_dir),
            max_length=lm_eval_max_length,
            lengths=lens,
            limit=lm_eval_limit,
            include_path=str(lm_eval_include) if lm_eval_include else None,
            metric=lm_eval_metric,
        )
    niah = None
    if recall_items is None and lm is None:
        niah = NiahSettings(
            lengths=lens,
            task=task,
            samples=samples,
            seed=seed,
            scoring=scoring,
            beyond_context=beyond_context,
        )
    if device_map not in (None, "auto"):
        raise QKRestoreError(f"--device-map {device_map!r}: use auto")
    dev, dt = choose_device(device, dtype)
    return Measurement(
        niah=niah,
        recall_items=recall_items,
        reasoning_items=reasoning_items,
        lm_eval=lm,
        device=dev,
        dtype=dt,
        autocast=autocast,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )


def _digest(items: Sequence[Item] | None) -> str | None:
    if items is None:
        return None
    body = json.dumps([[x.prompt, x.answer, x.group] for x in items])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def measure_settings(cfg: Any) -> dict[str, Any]:
    """What a resumed run must share with the one it continues (the measuring half)."""
    return {
        "niah": niah_doc(cfg.niah) if cfg.recall_items is None else None,
        "recall_items": _digest(cfg.recall_items),
        "reasoning_items": _digest(getattr(cfg, "reasoning_items", None)),
        "reasoning_metric": getattr(cfg, "reasoning_metric", None),
        "lm_eval": asdict(cfg.lm_eval) if cfg.lm_eval is not None else None,
        "device": str(cfg.device),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "autocast": bool(cfg.autocast and cfg.device.type == "cuda"),
        "batch_size": cfg.batch_size,
    }


def niah_doc(niah: NiahSettings | None) -> dict[str, Any] | None:
    if niah is None:
        return None
    return {"task": niah.task, "lengths": list(niah.lengths), "samples": niah.samples} | {
        "seed": niah.seed,
        "scoring": niah.scoring,
    }


def _group_sizes(items: Sequence[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x.group or "all"] = out.get(x.group or "all", 0) + 1
    return out


def measure(
    runner: Runner, cfg: Any, tokenizer: Any, advance: Callable[[int], None]
) -> dict[str, Any]:
    """Recall (NIAH or a recall file), reasoning and lm-eval scores of the weights loaded now, each
    exact-match score with its trial count and 95 % Wilson interval (:mod:`qkrestore.evaluate.probe`)."""
    out: dict[str, Any] = {}
    trials: dict[str, int] = {}
    if cfg.recall_items is not None:
        rows = runner.score_items(cfg.recall_items, advance)
        out["recall"] = recall_by_group(cfg.recall_items, rows)
        trials = _group_sizes(cfg.recall_items)
    elif cfg.niah is not None:
        out["recall"] = runner.niah(cfg.niah, advance)
        trials = dict.fromkeys(out["recall"], cfg.niah.samples)
    if "recall" in out:
        out["recall_mean"] = mean(list(out["recall"].values()))
        out["recall_n"] = trials
        out["recall_ci"] = {k: interval(v, trials[k]) for k, v in out["recall"].items()}
        out["recall_mean_ci"] = interval(out["recall_mean"], sum(trials.values()))
    reasoning_items = getattr(cfg, "reasoning_items", None)
    if reasoning_items is not None:
        summary: dict[str, Any] = dict(
            summarise_items(runner.score_items(reasoning_items, advance))
        )
        summary["exact_ci"] = interval(summary["exact"], int(summary["items"]))
        out["reasoning"] = summary
        out["reasoning_score"] = summary[cfg.reasoning_metric]
    if cfg.lm_eval is not None:
        res = run_lm_eval(runner.model, tokenizer, runner.device, cfg.lm_eval, cfg.autocast)
        out["lm_eval"] = res
        out["lm_eval_score"] = lm_eval_score(res, cfg.lm_eval.metric)
        advance(1)
    return out


def needs_tok(cfg: Any) -> bool:
    return (
        (cfg.niah is not None and cfg.recall_items is None)
        or needs_tokenizer(cfg.recall_items or ())
        or needs_tokenizer(getattr(cfg, "reasoning_items", None) or ())
        or cfg.lm_eval is not None
    )


def binomial(row: dict[str, Any], metric: str, reasoning_metric: str | None) -> dict[str, Any]:
    """``{score, ci, n}`` of an exact-match metric of one row (empty for other metrics)."""
    if metric == "recall":
        n = sum((row.get("recall_n") or {}).values())
        return {"score": row.get("recall_mean"), "ci": row.get("recall_mean_ci"), "n": n}
    if metric.startswith("recall@"):
        key = metric.split("@", 1)[1]
        return {
            "score": (row.get("recall") or {}).get(key),
            "ci": (row.get("recall_ci") or {}).get(key),
            "n": (row.get("recall_n") or {}).get(key, 0),
        }
    if metric == "exact" or (metric == "reasoning" and reasoning_metric == "exact"):
        r = row.get("reasoning") or {}
        return {"score": r.get("exact"), "ci": r.get("exact_ci"), "n": r.get("items", 0)}
    return {}
