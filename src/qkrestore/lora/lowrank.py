"""QK-Pro on a LoRA delta: the closed form applied to ``lora_B``, so the result stays low-rank.

With the fixed side held at PRE (``--fix key``: W_K = K_pre), QK-Pro's query head is
``Q_h = Q_h^pre + λ_h (G_h + λ_h I)⁻¹ (Q_h^post − Q_h^pre)`` with ``G_h = K_g^pre K_g^preᵀ``
(docs/qk-pro.md). For an adapter ``Q^post − Q^pre = s·B·A``, so head ``h``'s rows of the delta
become ``s · [λ_h (G_h + λ_h I)⁻¹ B_h] · A``: a new ``B`` with the same ``A``, rank and scale.
``--fix query`` is the mirror image on W_K's rows with ``G_g = Σ_{h∈g} Q_h^pre Q_h^preᵀ``.

The solve itself is :mod:`qkrestore.pro_math`'s, called through :func:`solve_free_rows` only: it
is affine in (P_pre, P_post), so passing ``P_pre = 0`` and ``P_post = B_h`` yields exactly
``λ_h (G_h + λ_h I)⁻¹ B_h`` (and ``B_h`` where G is zero, as the full solve gives POST there).
pro_math wants both sides as wide as each other; zero columns change neither ``G`` nor the solved
columns, so the narrower side is padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pro_math import solve as solve_heads


def solve_free_rows(
    b_rows: Sequence[torch.Tensor],
    fixed_pre: Sequence[torch.Tensor],
    fix: str,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """New ``lora_B`` rows of the free side, for several layers of equal shape at once.

    ``b_rows[i]`` holds the free side's routing rows of ``lora_B`` (``rows × r``, head-major as in
    W_Q/W_K); ``fixed_pre[i]`` PRE's rows of the fixed side (``rows × d``). Returns float64 (CPU)
    or float32 (CUDA) tensors of ``b_rows[i]``'s shape, on the CPU.
    """
    width = max(max(b.shape[1] for b in b_rows), max(f.shape[1] for f in fixed_pre))
    free_post = [_pad(b, width) for b in b_rows]
    free_pre = [torch.zeros_like(b) for b in free_post]
    fixed = [_pad(f, width) for f in fixed_pre]
    out = solve_heads(fix, free_pre, free_post, fixed, n_heads, n_kv_heads, ridge, device=device)
    return [o[:, : b.shape[1]].to("cpu") for o, b in zip(out, b_rows)]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.to(torch.float32) if not t.is_floating_point() else t
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))
