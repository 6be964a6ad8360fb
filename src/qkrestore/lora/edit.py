"""The new adapter tensors: zeroed, solved or restored rows, and DoRA magnitudes (values only).

Edits are computed once and shared by both outputs: the adapter writer stores them, the model writer
merges them into PRE. Only changed tensors are held (``lora_B`` factors, magnitudes, saved
parameters of routing modules): a few megabytes even for a 9B model's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import text_config
from ..checkpoint import Checkpoint
from ..dtypes import to_tensor, torch_dtype
from ..errors import PlanError
from ..pro_math import resolve_device
from ..tensors import read_rows
from .lowrank import solve_free_rows
from .plan import DROP, RESTORE, SOLVE, ZERO, AdapterPlan, ModuleAction
from .reader import LoraAdapter


@dataclass
class AdapterEdits:
    """Adapter keys to leave out, and replacement values (in the key's own dtype) for others."""

    dropped_keys: set[str] = field(default_factory=set)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    solve_stats: dict[str, object] = field(default_factory=dict)


def read_tensor(ck: Checkpoint, name: str) -> torch.Tensor:
    info = ck.info(name)
    return to_tensor(ck.read(name), info.dtype, info.shape)


def compute_edits(adapter: LoraAdapter, aplan: AdapterPlan, pre: Checkpoint) -> AdapterEdits:
    """Apply every action of ``aplan`` to the adapter's tensors."""
    edits = AdapterEdits()
    for act in aplan.actions:
        if act.action == DROP:
            edits.dropped_keys.update(adapter.modules[act.module].keys())
        elif act.action == ZERO:
            _zero_rows(adapter, act, pre, edits)
        elif act.action == RESTORE:
            key = adapter.saved[act.module]
            info = adapter.weights.tensors[key]
            value = read_tensor(adapter.weights, key).clone()
            pre_info = pre.info(act.module)
            for r0, r1 in act.rows:
                rows = to_tensor(
                    pre.read(act.module, (r0, r1)), pre_info.dtype, (r1 - r0, *pre_info.shape[1:])
                )
                value[r0:r1] = rows.to(torch_dtype(info.dtype))
            edits.values[key] = value
    solving = [a for a in aplan.actions if a.action == SOLVE]
    if solving:
        _solve(adapter, aplan, pre, solving, edits)
    return edits


def _zero_rows(
    adapter: LoraAdapter, act: ModuleAction, pre: Checkpoint, edits: AdapterEdits
) -> None:
    mod = adapter.modules[act.module]
    b = read_tensor(adapter.weights, mod.b.name).clone()
    for r0, r1 in act.rows:
        b[r0:r1] = 0
    edits.values[mod.b.name] = b
    if mod.magnitude is not None:
        # DoRA merges row i as m_i · (W_i + s·B_i·A) / ‖W_i + s·B_i·A‖; with B_i = 0 that is W_i
        # exactly when m_i = ‖W_i‖ (peft/tuners/lora/variants.py::DoraLinearVariant.merge_safe).
        m = read_tensor(adapter.weights, mod.magnitude.name).clone()
        w = read_rows(pre, mod.weight_name, act.rows, torch.float32)
        m[_index(act.rows)] = torch.linalg.norm(w, dim=1).to(m.dtype)
        edits.values[mod.magnitude.name] = m


def _index(rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in rows])


def _solve(
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    pre: Checkpoint,
    solving: list[ModuleAction],
    edits: AdapterEdits,
) -> None:
    plan = aplan.plan
    fix, ridge = plan.params["fix"], float(plan.params["ridge"])
    device = resolve_device(plan.params["device"])
    n_heads = int(text_config(pre.config).get("num_attention_heads") or 0)
    fixed_target = "k" if fix == "key" else "q"
    groups: dict[tuple, list[tuple[ModuleAction, torch.Tensor, torch.Tensor]]] = {}
    for act in solving:
        mod = adapter.modules[act.module]
        fixed = next(
            p
            for p in plan.patches
            if p.layer == act.layer and p.target == fixed_target and p.role == "weight"
        )
        b = read_tensor(adapter.weights, mod.b.name)
        b_rows = torch.cat([b[r0:r1] for r0, r1 in act.rows])
        k = read_rows(pre, fixed.pre_name, fixed.rows)
        key = (tuple(b_rows.shape), tuple(k.shape))
        groups.setdefault(key, []).append((act, b_rows, k))
    systems = 0
    for items in groups.values():
        q_rows = items[0][1].shape[0] if fix == "key" else items[0][2].shape[0]
        k_rows = items[0][2].shape[0] if fix == "key" else items[0][1].shape[0]
        d_h, rem = divmod(q_rows, n_heads) if n_heads > 0 else (0, 1)
        if rem or d_h == 0 or k_rows % d_h or n_heads % (k_rows // d_h):
            raise PlanError(
                f"layer {items[0][0].layer}: {q_rows} query rows and {k_rows} key rows do not "
                f"split into {n_heads} heads of equal size"
            )
        n_kv = k_rows // d_h
        solved = solve_free_rows(
            [b for _, b, _ in items], [k for _, _, k in items], fix, n_heads, n_kv, ridge, device
        )
        systems += len(items) * (n_heads if fix == "key" else n_kv)
        for (act, _, _), rows in zip(items, solved):
            mod = adapter.modules[act.module]
            b = read_tensor(adapter.weights, mod.b.name).clone()
            at = 0
            for r0, r1 in act.rows:
                b[r0:r1] = rows[at : at + r1 - r0].to(b.dtype)
                at += r1 - r0
            edits.values[mod.b.name] = b
    edits.solve_stats = {"layers": len(solving), "systems": systems, "device": str(device)}
