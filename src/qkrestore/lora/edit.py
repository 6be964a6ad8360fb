"""The new adapter tensors: zeroed, solved or restored rows, and DoRA magnitudes.

Edits are computed once and shared by both outputs: the adapter writer stores them, the model writer
merges them into PRE. They are raw bytes in each tensor's own dtype, and only changed tensors are
held (``lora_B`` factors, magnitudes, saved parameters of routing modules): a few megabytes even for
a 9B model's adapter.

Zeroing rows and restoring saved rows are byte operations (a zero is all-zero bytes in every float
dtype), so plain QK-Restore on an adapter never imports torch; only DoRA magnitudes, QK-Pro's solve
and dtype casts need it, and import it then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapters import text_config
from ..checkpoint import Checkpoint
from ..dtypes import convert
from ..errors import PlanError
from .plan import DROP, RESTORE, SOLVE, ZERO, AdapterPlan, ModuleAction
from .reader import LoraAdapter

if TYPE_CHECKING:
    import torch


@dataclass
class AdapterEdits:
    """Adapter keys to leave out, and replacement bytes (in the key's own dtype) for others."""

    dropped_keys: set[str] = field(default_factory=set)
    values: dict[str, bytes] = field(default_factory=dict)
    solve_stats: dict[str, Any] = field(default_factory=dict)


def read_tensor(ck: Checkpoint, name: str) -> torch.Tensor:
    from ..dtypes import to_tensor

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
            value = bytearray(adapter.weights.read(key))
            pre_dtype = pre.info(act.module).dtype
            for r0, r1 in act.rows:
                rows = pre.read(act.module, (r0, r1))
                if pre_dtype != info.dtype:
                    rows = convert(rows, pre_dtype, info.dtype)
                value[r0 * info.row_bytes : r1 * info.row_bytes] = rows
            edits.values[key] = bytes(value)
    solving = [a for a in aplan.actions if a.action == SOLVE]
    if solving:
        _solve(adapter, aplan, pre, solving, edits)
    return edits


def _zero_rows(
    adapter: LoraAdapter, act: ModuleAction, pre: Checkpoint, edits: AdapterEdits
) -> None:
    mod = adapter.modules[act.module]
    b = bytearray(adapter.weights.read(mod.b.name))
    width = mod.b.row_bytes
    for r0, r1 in act.rows:
        b[r0 * width : r1 * width] = bytes((r1 - r0) * width)
    edits.values[mod.b.name] = bytes(b)
    if mod.magnitude is not None:
        # DoRA merges row i as m_i · (W_i + s·B_i·A) / ‖W_i + s·B_i·A‖; with B_i = 0 that is W_i
        # when m_i = ‖W_i‖ (peft/tuners/lora/variants.py::DoraLinearVariant.merge_safe).
        import torch

        from ..dtypes import to_bytes
        from ..tensors import read_rows

        m = read_tensor(adapter.weights, mod.magnitude.name).clone()
        w = read_rows(pre, mod.weight_name, act.rows, torch.float32)
        index = torch.cat([torch.arange(a, b) for a, b in act.rows])
        m[index] = torch.linalg.norm(w, dim=1).to(m.dtype)
        edits.values[mod.magnitude.name] = to_bytes(m, mod.magnitude.dtype)


def _solve(
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    pre: Checkpoint,
    solving: list[ModuleAction],
    edits: AdapterEdits,
) -> None:
    from ..dtypes import to_bytes
    from ..runtime import resolve_device
    from ..tensors import read_rows
    from .lowrank import solve_free_rows

    plan = aplan.plan
    fix, ridge = plan.params["fix"], float(plan.params["ridge"])
    device = resolve_device(plan.params["device"])
    n_heads = int(text_config(pre.config).get("num_attention_heads") or 0)
    fixed_target = "k" if fix == "key" else "q"
    groups: dict[tuple, list[tuple[ModuleAction, Any, Any]]] = {}
    for act in solving:
        mod = adapter.modules[act.module]
        fixed = next(
            p
            for p in plan.patches
            if p.layer == act.layer and p.target == fixed_target and p.role == "weight"
        )
        b_rows = read_rows(adapter.weights, mod.b.name, act.rows)
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
            edits.values[mod.b.name] = to_bytes(b, mod.b.dtype)
    edits.solve_stats = {"layers": len(solving), "systems": systems, "device": str(device)}
