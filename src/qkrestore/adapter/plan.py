"""What QK-Restore (or QK-Pro) does to each module of a LoRA adapter, planned from data alone.

Since POST = PRE + adapter, the family's restore plan is built with PRE on both sides (an adapter
changes no shape) and then read module by module. For every output weight the plan touches:

* ``drop``: every row of the module's output is routing (``k_proj``, a plain ``q_proj``): the module
  leaves the adapter and is named in ``exclude_modules`` so peft does not re-create it empty;
* ``zero``: only some rows are routing (Qwen3-Next's gated ``q_proj``, a fused ``qkv_proj``, MLA's
  ``kv_b_proj``): those rows of ``lora_B`` become zero (and DoRA's magnitude there becomes the norm
  of PRE's row, so the merged row is PRE's);
* ``solve``: QK-Pro's free side: those rows of ``lora_B`` are replaced by the closed form (same
  ``lora_A``, same rank);
* ``keep``: everything else, including same-named modules of linear-attention layers, which are not
  in the plan because layer kinds come from the config.

Parameters saved whole (``modules_to_save``) that the plan touches get PRE's rows (``restore``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError
from ..families.base import RowRanges
from ..io.checkpoint import TensorInfo
from ..surgery.plan import RestorePlan, TensorPatch
from .reader import LoraAdapter

KEEP, DROP, ZERO, SOLVE, RESTORE = "keep", "drop", "zero", "solve", "restore"


@dataclass(frozen=True)
class ModuleAction:
    """One adapter module (or saved parameter) and what happens to it."""

    module: str  # module name, or the parameter name for a saved tensor
    action: str  # KEEP | DROP | ZERO | SOLVE | RESTORE
    layer: int | None = None
    target: str = ""
    rows: RowRanges = ()  # output rows concerned (routing rows, or solved rows)
    saved: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "action": self.action,
            "layer": self.layer,
            "target": self.target,
            "rows": [list(r) for r in self.rows],
            "saved": self.saved,
        }


@dataclass
class AdapterPlan:
    """The restore plan seen through an adapter: one action per module and saved parameter."""

    plan: RestorePlan
    actions: list[ModuleAction]

    def by_module(self) -> dict[str, ModuleAction]:
        return {a.module: a for a in self.actions}

    def dropped(self) -> list[str]:
        return [a.module for a in self.actions if a.action == DROP]

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for a in self.actions:
            counts[a.action] = counts.get(a.action, 0) + 1
        return {"counts": counts, "modules": [a.to_json() for a in self.actions]}


def check_base(adapter: LoraAdapter, pre_tensors: Mapping[str, TensorInfo], pre_root: str) -> None:
    """Refuse an adapter trained on another base: every module and saved tensor must fit PRE."""
    where = adapter.file
    for mod in adapter.modules.values():
        base = pre_tensors.get(mod.weight_name)
        if base is None:
            raise PlanError(
                f"{where}: module '{mod.name}' has no weight '{mod.weight_name}' in PRE "
                f"({pre_root})",
                hint="is PRE the base model this adapter was trained on?",
            )
        if base.shape != mod.delta_shape:
            raise PlanError(
                f"{where}: module '{mod.name}' changes a {list(mod.delta_shape)} weight but PRE's "
                f"'{mod.weight_name}' is {list(base.shape)}",
                hint="the adapter was trained on another base model",
            )
    for name, key in adapter.saved.items():
        base = pre_tensors.get(name)
        info = adapter.weights.tensors[key]
        # A saved parameter PRE does not store (a tied lm_head) matters only for model out.
        if base is not None and base.shape != info.shape:
            have = f"{list(base.shape)}"
            raise PlanError(
                f"{where}: saved tensor '{key}' is {list(info.shape)} but PRE's '{name}' is {have}",
                hint="the adapter was trained on another base model (or resized its vocabulary)",
            )
    # Every module the config selects exists in PRE, so a target_modules that selects nothing of
    # PRE explains none of the adapter's weights either.
    modules = {n.removesuffix(".weight") for n in pre_tensors if n.endswith(".weight")}
    if adapter.config.target_modules is not None and not any(
        adapter.config.targets(m) for m in modules
    ):
        raise PlanError(
            f"{adapter.config.path}: target_modules {adapter.config.target_modules!r} selects no "
            f"module of PRE ({pre_root})",
            hint="is PRE the base model this adapter was trained on?",
        )


def plan_adapter(
    adapter: LoraAdapter, plan: RestorePlan, *, solve_here: bool = True
) -> AdapterPlan:
    """One action per adapter module and saved tensor, from the family's restore plan.

    ``solve_here``: computed rows are solved on the adapter's factors (adapter out), so they must
    stay low-rank; without it (``--merge-adapter``) they are solved on the merged checkpoint.
    """
    low_rank = plan.params.get("form", "ridge") == "ridge"
    patches: dict[str, TensorPatch] = plan.by_name()
    actions: list[ModuleAction] = []
    for mod in adapter.modules.values():
        p = patches.get(mod.weight_name)
        if p is None:
            actions.append(ModuleAction(mod.name, KEEP))
            continue
        if mod.kind != "linear":
            raise PlanError(f"{adapter.file}: routing module '{mod.name}' is not a linear layer")
        if p.source == "computed" and solve_here:
            if not low_rank:
                raise PlanError(
                    f"--form {plan.params['form']}: its result on '{mod.name}' is not low-rank, so "
                    "it cannot be written as a PEFT adapter",
                    hint="add --merge-adapter to write PRE + the adapter as a full checkpoint",
                )
            if mod.magnitude is not None:
                raise PlanError(
                    f"{adapter.file}: '{mod.name}' is a DoRA module: its merged weight rescales "
                    "every row, so QK-Pro's result is not low-rank",
                    hint="merge the adapter with peft and run 'qkrestore pro' on the merged "
                    "checkpoint, or use 'qkrestore merge' (QK-Restore) on the adapter",
                )
            action = SOLVE
        elif p.source == "computed":
            action = SOLVE
        elif p.rows == ((0, p.shape[0]),):
            action = DROP
        else:
            action = ZERO
        actions.append(ModuleAction(mod.name, action, p.layer, p.target, p.rows))
    for name in adapter.saved:
        p = patches.get(name)
        if p is None:
            actions.append(ModuleAction(name, KEEP, saved=True))
            continue
        if p.source == "computed" and solve_here:
            raise PlanError(
                f"{adapter.file}: '{name}' is saved whole (modules_to_save) and is QK-Pro's free "
                "side; QK-Pro on a full saved weight is not low-rank",
                hint="merge the adapter with peft and run 'qkrestore pro' on the merged checkpoint",
            )
        actions.append(ModuleAction(name, RESTORE, p.layer, p.target, p.rows, saved=True))
    return AdapterPlan(plan, actions)
