"""``qkrestore select-layers``: which softmax layers carry retrieval (the paper's Appendix M).

Why: in a model with many softmax-attention layers (pure-softmax models, or hybrids with many),
restoring all of them brings back more of the fine-tune's loss than needed. Appendix M scores each
layer by ablation: set the layer's W_Q to zero, so its attention becomes uniform and can no longer
look anything up, and measure how much retrieval falls. Layers whose ablation hurts most are the
ones worth restoring.

The ablated rows are exactly the query rows the planner names for the layer (only the query rows
of gated or fused tensors), zeroed in one loaded model and put back before the next layer; no
checkpoint is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import layer_map
from .candidates import ModelPatcher, ablation_values
from .checkpoint import Checkpoint
from .errors import PlanError
from .evaluation import LmEvalSettings, NiahSettings, Runner, load_model, load_tokenizer
from .plan import PlanOptions, build_plan, choose_layers
from .sweep import SweepConfig, measure, needs_tok


@dataclass(frozen=True)
class SelectConfig:
    """``select-layers``' options, parsed."""

    layers: list[int] | None = None
    include_sliding: bool = True
    niah: NiahSettings | None = None
    recall_items: Sequence[Any] | None = None
    lm_eval: LmEvalSettings | None = None
    device: Any = None
    dtype: Any = None
    autocast: bool = True
    batch_size: int = 8  # items scored per forward pass (evaluation.Runner.score_items)
    trust_remote_code: bool = False
    device_map: str | None = None  # accelerate's placement ("auto") for models beyond one device

    def as_sweep(self) -> SweepConfig:
        """The measuring options in the form :func:`qkrestore.sweep.measure` takes."""
        return SweepConfig(
            niah=self.niah,
            recall_items=self.recall_items,
            lm_eval=self.lm_eval,
            device=self.device,
            dtype=self.dtype,
            autocast=self.autocast,
            batch_size=self.batch_size,
            device_map=self.device_map,
        )


def retrieval(measured: dict[str, Any]) -> float | None:
    """The one retrieval number a layer is scored with: mean recall, else the lm-eval score."""
    if measured.get("recall_mean") is not None:
        return measured["recall_mean"]
    return measured.get("lm_eval_score")


def rank(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers by the drop their ablation causes, largest first (ties: lower layer first)."""
    return sorted(rows, key=lambda r: (-(r["drop"] if r["drop"] is not None else -1e9), r["layer"]))


def run_select_layers(
    model_dir: Path,
    cfg: SelectConfig,
    on_start: Callable[[int, int, str, int], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Measure the unablated model, then each layer with its W_Q zeroed; the JSON document."""
    advance = advance or (lambda n: None)
    sweep_cfg = cfg.as_sweep()
    with Checkpoint.open(model_dir) as ck:
        lmap = layer_map(ck.config, ck.tensors)
        model_type, kinds = lmap.model_type, lmap.kinds
        layers = choose_layers(kinds, cfg.layers, cfg.include_sliding)
        plans = {i: build_plan(ck, ck, PlanOptions(layers=[i], targets=("q",))) for i in layers}
        for i, plan in plans.items():
            if not ablation_values(plan):
                raise PlanError(f"layer {i}: the plan names no query weight to ablate")
        tokenizer = load_tokenizer(model_dir) if needs_tok(sweep_cfg) else None
        model = load_model(model_dir, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.device_map)
        runner = Runner.from_settings(model, tokenizer, cfg, str(model_dir))
        patcher = ModelPatcher(model)
        n_units = _units(sweep_cfg)
        total = len(layers) + 1
        t0 = time.perf_counter()
        if on_start:
            on_start(1, total, "unablated", n_units)
        base = measure(runner, sweep_cfg, tokenizer, advance)
        base_score = retrieval(base)
        rows = []
        for k, i in enumerate(layers, 2):
            if on_start:
                on_start(k, total, f"layer {i} W_Q = 0", n_units)
            plan = plans[i]
            patcher.apply(plan, ablation_values(plan))
            got = measure(runner, sweep_cfg, tokenizer, advance)
            score = retrieval(got)
            drop = None if score is None or base_score is None else base_score - score
            rows.append({"layer": i, "kind": kinds[i].value, "drop": drop, **got})
        patcher.reset()
    ranked = rank(rows)
    for pos, r in enumerate(ranked, 1):
        r["rank"] = pos
    return {
        "model": str(model_dir),
        "model_type": model_type,
        "layers": layers,
        "device": str(cfg.device),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "retrieval": (
            "recall-file"
            if cfg.recall_items is not None
            else "niah"
            if cfg.niah is not None
            else "lm-eval"
        ),
        "unablated": base,
        "unablated_score": base_score,
        "ranking": ranked,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _units(cfg: SweepConfig) -> int:
    n = 0
    if cfg.recall_items is not None:
        n += len(cfg.recall_items)
    elif cfg.niah is not None:
        n += len(cfg.niah.lengths) * cfg.niah.samples
    return n + (1 if cfg.lm_eval is not None else 0)


def select_recipe(model: Path, top: list[int], command: str) -> str:
    """A ``merge --config`` recipe restoring the chosen layers (sorted), with the command that
    chose them as a comment."""
    import yaml

    keys = {"layers": sorted(top), "targets": ["q", "k"]}
    head = (
        f"# layers chosen by: {command}\n"
        f"# (the {len(top)} layers of {model} whose W_Q ablation cost most retrieval)\n"
        "# use: qkrestore merge PRE POST -o OUT --config THIS_FILE\n"
    )
    return head + yaml.safe_dump(keys, sort_keys=False, default_flow_style=None)
