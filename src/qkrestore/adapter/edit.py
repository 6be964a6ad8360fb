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

from ..families import text_config
from ..io.checkpoint import Checkpoint
from ..io.dtypes import convert
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
    from ..io.dtypes import to_tensor

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

        from ..io.dtypes import to_bytes
        from ..io.tensors import read_rows

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
    """QK-Pro on ``lora_B``, through the head split and batching that checkpoints use.

    With the fixed side held at PRE, QK-Pro's free head is ``P_pre + λ_h (G_h + λ_h I)⁻¹ (P_post −
    P_pre)`` (docs/qk-pro.md), affine in (P_pre, P_post); for an adapter ``P_post − P_pre = s·B·A``,
    so passing ``P_pre = 0`` and ``P_post = B_h`` yields the new ``B_h`` for the same ``A``, rank
    and scale. pro_math wants both sides equally wide; zero columns change neither ``G`` nor the
    solved columns, so the narrower side is padded, and the result cut back to the rank.
    """
    import torch

    from ..io.dtypes import to_bytes
    from ..io.tensors import read_rows
    from ..qkpro.method import free_and_fixed, solve_layers

    plan = aplan.plan
    _, fixed_target = free_and_fixed(plan)
    by_layer = {act.layer: act for act in solving}

    def pad(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t

    def rows(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        act = by_layer[layer]
        b = read_rows(adapter.weights, adapter.modules[act.module].b.name, act.rows)
        fixed = next(
            p
            for p in plan.patches
            if p.layer == layer and p.target == fixed_target and p.role == "weight"
        )
        k = read_rows(pre, fixed.pre_name, fixed.rows)
        width = max(b.shape[1], k.shape[1])
        b, k = pad(b, width), pad(k, width)
        return torch.zeros_like(b), b, k

    def put(layer: int, solved: torch.Tensor) -> None:
        act = by_layer[layer]
        mod = adapter.modules[act.module]
        b = read_tensor(adapter.weights, mod.b.name).clone()
        at = 0
        for r0, r1 in act.rows:
            b[r0:r1] = solved[at : at + r1 - r0, : b.shape[1]].to(b.dtype)
            at += r1 - r0
        edits.values[mod.b.name] = to_bytes(b, mod.b.dtype)

    n_heads = int(text_config(pre.config).get("num_attention_heads") or 0)
    edits.solve_stats = solve_layers(
        plan,
        n_heads,
        rows,
        put,
        layers=sorted(by_layer),  # type: ignore[arg-type]
        name=lambda layer: adapter.modules[by_layer[layer].module].b.name,
    )
