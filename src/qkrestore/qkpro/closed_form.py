"""QK-Pro: closed-form, ridge-relaxed restoration of attention logits.

This module is pure math: no file I/O, no checkpoint knowledge. It takes the
query and key projection weights of a PRE checkpoint (before some fine-tune or
edit) and a POST checkpoint (after it), holds one side at PRE and moves the
other side as little as possible away from POST while pulling the bilinear
form ``Q_hᵀ K_g`` (which is what attention logits see) back towards PRE's.

Layout is Hugging Face's: rows are output features. Query head ``h`` is the
``d_h × d`` block of rows ``h*d_h:(h+1)*d_h`` of ``W_Q``; it reads key/value
group ``g = h // (n_heads // n_kv_heads)``, the ``d_h × d`` block ``K_g`` of
``W_K`` (grouped-query attention, as in HF's ``repeat_kv``).

Entry points
------------
``solve(fix, free_pre, free_post, fixed_pre, n_heads, n_kv_heads, ridge, *, device="cpu")``
    ``fix="key"``: ``K := K^pre``; returns the new ``W_Q``. Per head
    ``Q_h = Q_h^post + G_h (G_h + λ_h I)⁻¹ (Q_h^pre − Q_h^post)``,
    ``G_h = K_g^pre K_g^preᵀ``, ``λ_h = ridge · trace(G_h) / d_h``.
    ``fix="query"``: ``Q := Q^pre``; returns the new ``W_K``. Per group
    ``K_g = K_g^post + G_g (G_g + λ_g I)⁻¹ (K_g^pre − K_g^post)``,
    ``G_g = Σ_{h∈g} Q_h^pre Q_h^preᵀ``, ``λ_g = ridge · trace(G_g) / d_h``.
    One layer (2-D inputs) or many (``(L, rows, d)`` tensors or sequences of
    ``L`` matrices): every head of every layer becomes one ``d_h × d_h``
    system and all of them go to ``torch.linalg.solve`` as a single
    ``(n_systems, d_h, d_h)`` batch with a ``(n_systems, d_h, d)`` right-hand
    side (split into a few layer chunks only to bound memory).
``objective`` / ``stationarity_residual``
    The penalty objective being minimised and the relative residual of its
    stationarity condition, both in float64 on CPU, for tests and benchmarks.

Device choice lives in :mod:`qkrestore.io.runtime`.

Results come back on the compute device in float64 (CPU) or float32 (CUDA),
unless ``out_dtype`` asks otherwise; casting to the checkpoint's dtype is the
caller's job. Inputs may be any floating dtype (bf16 included) and are
upcast before any arithmetic.

``ridge == 0`` returns PRE's free-side weights exactly (the constraint-only
limit; see ``docs/qk-pro.md`` for why that is the right limit even when ``G``
is singular) and ``ridge == inf`` returns POST's. A group whose ``G`` is
exactly zero (all-zero fixed block) has no constraint, so it gets POST.

Why the ``P_pre − λ (G + λI)⁻¹ D`` form: with ``D = P_pre − P_post`` the closed
form can be written either as ``P_post + G (G+λI)⁻¹ D`` or, equivalently
(``G`` and ``(G+λI)⁻¹`` commute), as ``P_pre − λ (G+λI)⁻¹ D``. Both cost one
solve; rounding is smallest when the correction added is the small one, so
``ridge <= 1`` uses the PRE-anchored form (exact as ridge → 0) and ``ridge > 1``
the POST-anchored one (exact as ridge → ∞).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast

import torch

from ..io.runtime import compute_dtype_for, resolve_device

__all__ = [
    "Fix",
    "LayerStack",
    "Method",
    "objective",
    "row_space_basis",
    "solve",
    "solve_cross_gram",
    "solve_cross_gram_batched",
    "stationarity_residual",
]

Fix = Literal["key", "query"]
"""Which side is held at PRE: ``"key"`` moves W_Q, ``"query"`` moves W_K."""

Method = Literal["solve", "inverse"]
"""How the batched ``(G + λI) Y = D`` systems are solved.

``"solve"``: ``torch.linalg.solve`` on ``(n_systems, d_h, d_h)`` with the full
``(n_systems, d_h, d)`` right-hand side (LU with pivoting; the reference).
``"inverse"``: invert the small ``d_h × d_h`` matrices once, fold the ±λ or
``G`` factor into them, then apply with one fused ``baddbmm`` (a plain batched
GEMM, usually the fastest on GPUs; the matrices are symmetric positive
definite with condition number at most ``1 + d_h / ridge``, so explicit
inversion loses little).
"""

LayerStack = torch.Tensor | Sequence[torch.Tensor]
"""Per-layer weights: a ``(L, rows, d)`` tensor or a sequence of ``L`` ``(rows, d)``."""

_DEFAULT_CPU_CHUNK_BYTES = 512 * 2**20
_MIN_CUDA_CHUNK_BYTES = 256 * 2**20
_MAX_CUDA_CHUNK_BYTES = 4 * 2**30


# --------------------------------------------------------------------------- checks


def _as_stack(x: LayerStack, name: str) -> torch.Tensor | list[torch.Tensor]:
    """Normalise a layer stack to a 3-D tensor or a list of 2-D tensors."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            return x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a (L, rows, d) tensor, got shape {tuple(x.shape)}")
        return x
    items = list(x)
    if not items:
        raise ValueError(f"{name}: empty layer sequence")
    shape = None
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-D tensor")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise ValueError(
                f"{name}[{i}]: shape {tuple(t.shape)} differs from {name}[0] {tuple(shape)}; "
                "batch layers of one shape together"
            )
    return items


def _stack_shape(x: torch.Tensor | list[torch.Tensor]) -> tuple[int, int, int]:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    return len(x), int(x[0].shape[0]), int(x[0].shape[1])


def _stack_dtype(x: torch.Tensor | list[torch.Tensor]) -> torch.dtype:
    return x.dtype if isinstance(x, torch.Tensor) else x[0].dtype


def _take(x: torch.Tensor | list[torch.Tensor], lo: int, hi: int, device: torch.device):
    """Layers ``lo:hi`` as one contiguous ``(hi-lo, rows, d)`` tensor on ``device``.

    A 3-D input already on the device is sliced without copying.
    """
    if isinstance(x, torch.Tensor):
        return x[lo:hi].to(device).contiguous()
    return torch.stack([t.to(device) for t in x[lo:hi]])


def _check_ridge(ridge: float) -> float:
    r = float(ridge)
    if math.isnan(r) or r < 0:
        raise ValueError(f"ridge must be >= 0 (or inf), got {ridge!r}")
    return r


def _check_heads(n_heads: int, n_kv_heads: int) -> int:
    """Validate the head counts; return the GQA group size ``n_heads // n_kv_heads``."""
    if n_heads <= 0 or n_kv_heads <= 0:
        raise ValueError(f"head counts must be positive, got {n_heads=} {n_kv_heads=}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    return n_heads // n_kv_heads


def _check_shapes(
    q_rows: int, k_rows: int, q_d: int, k_d: int, n_heads: int, n_kv_heads: int
) -> int:
    """Check that W_Q and W_K split into heads of one size; return ``d_h``."""
    if q_rows % n_heads:
        raise ValueError(f"W_Q has {q_rows} rows, not a multiple of n_heads={n_heads}")
    if k_rows % n_kv_heads:
        raise ValueError(f"W_K has {k_rows} rows, not a multiple of n_kv_heads={n_kv_heads}")
    d_h = q_rows // n_heads
    if k_rows // n_kv_heads != d_h:
        raise ValueError(
            f"head size mismatch: W_Q gives d_h={d_h} ({q_rows}/{n_heads}), "
            f"W_K gives {k_rows // n_kv_heads} ({k_rows}/{n_kv_heads}); "
            "pass only the query rows of a gated/fused projection"
        )
    if q_d != k_d:
        raise ValueError(f"W_Q has {q_d} input columns but W_K has {k_d}")
    return d_h


# --------------------------------------------------------------------------- core


def _grams(fixed: torch.Tensor, fix: Fix, n_heads: int, n_kv_heads: int, d_h: int) -> torch.Tensor:
    """One ``d_h × d_h`` Gram matrix per free block, from a chunk of the fixed side.

    ``fixed`` is ``(c, rows, d)`` in the compute dtype. Only ``d_h × d_h``
    products are formed (``K Kᵀ``, never ``Kᵀ K`` which would be ``d × d``),
    all in one ``bmm``.

    fix="key": fixed = W_K; head h gets its group's ``K_g K_gᵀ`` → ``(c*n_heads, d_h, d_h)``.
    fix="query": fixed = W_Q; group g gets ``Σ_{h∈g} Q_h Q_hᵀ`` → ``(c*n_kv_heads, d_h, d_h)``.
    """
    c, _, d = fixed.shape
    rep = n_heads // n_kv_heads
    blocks = fixed.reshape(-1, d_h, d)
    g = torch.bmm(blocks, blocks.mT)
    # bmm need not produce an exactly symmetric result; the math assumes it is.
    g = 0.5 * (g + g.mT)
    if fix == "key":
        g = g.view(c, n_kv_heads, 1, d_h, d_h).expand(c, n_kv_heads, rep, d_h, d_h)
        return g.reshape(c * n_heads, d_h, d_h)
    return g.view(c, n_kv_heads, rep, d_h, d_h).sum(dim=2).reshape(c * n_kv_heads, d_h, d_h)


def _lambdas(grams: torch.Tensor, ridge: float, d_h: int) -> torch.Tensor:
    """``λ = ridge · trace(G) / d_h`` per system, shape ``(S, 1, 1)``.

    trace(G)/d_h is G's mean eigenvalue, so ``ridge`` is relative to the scale
    of the fixed side: multiplying W_K by 10 leaves the solution unchanged.
    A zero G (no constraint) gets λ = 1 so that the system stays solvable; its
    solution is then POST, as it should be.
    """
    tr = grams.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam = tr * (ridge / d_h)
    lam = torch.where(tr > 0, lam, torch.ones_like(lam))
    return lam.view(-1, 1, 1)


def _solve_chunk(
    grams: torch.Tensor,
    free_pre: torch.Tensor,
    free_post: torch.Tensor,
    ridge: float,
    d_h: int,
    method: Method,
    out: torch.Tensor,
) -> None:
    """Write the closed-form solution of every system of a chunk into ``out``.

    ``grams`` ``(S, d_h, d_h)`` and ``out`` ``(S, d_h, d)`` are in the compute
    dtype; ``free_pre``/``free_post`` are ``(S, d_h, d)`` in any float dtype.
    """
    dtype = out.dtype
    if not bool(torch.isfinite(grams).all()):
        raise ValueError("the fixed side holds non-finite values (inf/NaN); cannot solve")
    lam = _lambdas(grams, ridge, d_h)
    dead = grams.diagonal(dim1=-2, dim2=-1).sum(-1) == 0  # no constraint: answer is POST
    eye = torch.eye(d_h, dtype=dtype, device=grams.device)
    a = grams + lam * eye
    # D = P_pre − P_post, exact: upcast first, then subtract in the compute dtype
    # (``torch.sub(bf16, bf16, out=f32)`` would round the difference to bf16).
    diff = free_pre.to(dtype, copy=True)
    diff.sub_(free_post)
    pre_anchored = ridge <= 1.0
    if method == "solve":
        y = torch.linalg.solve(a, diff)  # (G + λI) Y = D
        del diff
        if pre_anchored:  # X = P_pre − λ Y
            out.copy_(free_pre)
            out.sub_(y.mul_(lam))
        else:  # X = P_post + G Y
            out.copy_(free_post)
            out.baddbmm_(grams, y)
        _restore_dead(out, free_post, dead)
        return
    if method == "inverse":
        a_inv = torch.linalg.inv(a)
        if pre_anchored:
            m = a_inv.mul_(-lam)  # X = P_pre + (−λ A⁻¹) D
            out.copy_(free_pre)
        else:
            m = torch.bmm(grams, a_inv)  # X = P_post + (G A⁻¹) D
            out.copy_(free_post)
        out.baddbmm_(m, diff)
        _restore_dead(out, free_post, dead)
        return
    raise ValueError(f"unknown method {method!r}; expected 'solve' or 'inverse'")


def _restore_dead(out: torch.Tensor, free_post: torch.Tensor, dead: torch.Tensor) -> None:
    """Give systems with ``G == 0`` exactly POST's weights.

    Algebraically they already are (``P_pre − 1·(P_pre − P_post)``), but the
    PRE-anchored form leaves a rounding error there that is easy to avoid.
    """
    if bool(dead.any()):
        idx = dead.nonzero().squeeze(1)
        out.index_copy_(0, idx, free_post.index_select(0, idx).to(out.dtype))


def _auto_chunk_bytes(device: torch.device) -> int:
    """Memory budget for one chunk's compute-dtype copy of the big side.

    The solve needs a few such copies at once (D, the solution, LAPACK's
    column-major copies), so on CUDA take about an eighth of free memory.
    "Free" includes what PyTorch's caching allocator holds but no tensor uses:
    the driver alone would report it as taken, and repeated calls would then
    shrink to one-layer chunks.
    """
    if device.type != "cuda":
        return _DEFAULT_CPU_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    avail = free + max(cached, 0)
    return int(min(max(avail // 8, _MIN_CUDA_CHUNK_BYTES), _MAX_CUDA_CHUNK_BYTES))


def _solve_batched(
    fix: Fix,
    free_pre: LayerStack,
    free_post: LayerStack,
    fixed_pre: LayerStack,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    *,
    device: str | torch.device,
    out_dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None,
    method: Method,
    chunk_bytes: int | None,
) -> torch.Tensor:
    ridge = _check_ridge(ridge)
    _check_heads(n_heads, n_kv_heads)
    dev = resolve_device(device)
    dtype = compute_dtype or compute_dtype_for(dev)
    if not dtype.is_floating_point:
        raise ValueError(f"compute dtype must be floating point, got {dtype}")
    out_dtype = out_dtype or dtype
    if method not in ("solve", "inverse"):
        raise ValueError(f"unknown method {method!r}; expected 'solve' or 'inverse'")

    fp = _as_stack(free_pre, "free_pre")
    fq = _as_stack(free_post, "free_post")
    fx = _as_stack(fixed_pre, "fixed_pre")
    n_layers, free_rows, d = _stack_shape(fp)
    if _stack_shape(fq) != (n_layers, free_rows, d):
        raise ValueError(
            f"PRE and POST shapes differ: {_stack_shape(fp)} vs {_stack_shape(fq)} (L, rows, d)"
        )
    fx_layers, fixed_rows, fixed_d = _stack_shape(fx)
    if fx_layers != n_layers:
        raise ValueError(f"{n_layers} layers on the free side but {fx_layers} on the fixed side")
    for s in (fp, fq, fx):
        if not _stack_dtype(s).is_floating_point:
            raise ValueError(f"weights must be floating point, got {_stack_dtype(s)}")
    if fix == "key":
        d_h = _check_shapes(free_rows, fixed_rows, d, fixed_d, n_heads, n_kv_heads)
        n_free = n_heads
    else:
        d_h = _check_shapes(fixed_rows, free_rows, fixed_d, d, n_heads, n_kv_heads)
        n_free = n_kv_heads

    out = torch.empty((n_layers, free_rows, d), dtype=out_dtype, device=dev)
    if ridge == 0.0 or math.isinf(ridge):
        # Exact limits, no solve: ridge 0 is the hard constraint (PRE), inf is no constraint.
        src = fp if ridge == 0.0 else fq
        for lo in range(n_layers):
            out[lo].copy_(_take(src, lo, lo + 1, dev)[0])
        return out

    itemsize = torch.finfo(dtype).bits // 8
    per_layer = max(free_rows, fixed_rows) * d * itemsize
    budget = chunk_bytes if chunk_bytes is not None else _auto_chunk_bytes(dev)
    step = max(1, min(n_layers, int(budget) // max(per_layer, 1)))
    for lo in range(0, n_layers, step):
        hi = min(lo + step, n_layers)
        c = hi - lo
        fixed_c = _take(fx, lo, hi, dev).to(dtype)
        grams = _grams(fixed_c, fix, n_heads, n_kv_heads, d_h)
        del fixed_c
        pre_c = _take(fp, lo, hi, dev).view(c * n_free, d_h, d)
        post_c = _take(fq, lo, hi, dev).view(c * n_free, d_h, d)
        if out_dtype == dtype:
            _solve_chunk(grams, pre_c, post_c, ridge, d_h, method, out[lo:hi].view(-1, d_h, d))
        else:
            tmp = torch.empty((c * n_free, d_h, d), dtype=dtype, device=dev)
            _solve_chunk(grams, pre_c, post_c, ridge, d_h, method, tmp)
            out[lo:hi].copy_(tmp.view(c, free_rows, d))
    return out


# --------------------------------------------------------------------------- public


def solve(
    fix: Fix,
    free_pre: LayerStack,
    free_post: LayerStack,
    fixed_pre: LayerStack,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    *,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    method: Method = "solve",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """QK-Pro's free-side weights, for one layer or many at once.

    Args:
        fix: the side held at PRE. ``"key"``: the free side is W_Q (``n_heads*d_h`` rows), one
            system per query head with ``G_h = K_g^pre K_g^preᵀ``. ``"query"``: the free side is
            W_K (``n_kv_heads*d_h`` rows), one system per KV group with
            ``G_g = Σ_{h∈g} Q_h^pre Q_h^preᵀ`` (every query head that reads the group constrains it).
        free_pre, free_post: the free side's weights in PRE and POST.
        fixed_pre: the held side's weights in PRE.
            Each is one ``(rows, d)`` matrix (one layer; the result is 2-D too), or a
            ``(L, rows, d)`` tensor or a sequence of ``L`` matrices (the result is ``(L, rows, d)``).
        n_heads, n_kv_heads: attention heads and KV groups (the same for every layer).
        ridge: relaxation strength, ``>= 0``; 0 gives PRE's free side exactly, inf POST's.
        device: ``"auto" | "cpu" | "cuda"``; inputs are moved there chunk by chunk.
        out_dtype: dtype of the result (default: the compute dtype).
        compute_dtype: override float64-on-CPU / float32-on-CUDA.
        method: ``"solve"`` (LU, the default) or ``"inverse"``; see :data:`Method`.
        chunk_bytes: memory budget per chunk of layers (default: automatic).

    All systems of a chunk of layers are one ``torch.linalg.solve`` on ``(S, d_h, d_h)`` with a
    ``(S, d_h, d)`` right-hand side. The result lives on the compute device.
    """
    if fix not in ("key", "query"):
        raise ValueError(f"fix must be 'key' or 'query', got {fix!r}")
    inputs = (free_pre, free_post, fixed_pre)
    single = any(isinstance(t, torch.Tensor) and t.dim() == 2 for t in inputs)
    if single:  # one layer: all three must be matrices
        _require_2d(free_pre=free_pre, free_post=free_post, fixed_pre=fixed_pre)
        free_pre, free_post, fixed_pre = (
            cast("torch.Tensor", t).unsqueeze(0) for t in (free_pre, free_post, fixed_pre)
        )
    out = _solve_batched(
        fix,
        free_pre,
        free_post,
        fixed_pre,
        n_heads,
        n_kv_heads,
        ridge,
        device=device,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        method=method,
        chunk_bytes=chunk_bytes,
    )
    return out[0] if single else out


def _require_2d(**tensors: object) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 2-D weight matrix, got {shape}")


# --------------------------------------------------------------------------- diagnostics


def _diag_setup(
    new: torch.Tensor,
    pre: torch.Tensor,
    post: torch.Tensor,
    fixed_pre: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    fix: Fix,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 CPU ``(X, P_pre, P_post, G, λ)`` per system, for the diagnostics."""
    _require_2d(new=new, pre=pre, post=post, fixed_pre=fixed_pre)
    if fix not in ("key", "query"):
        raise ValueError(f"fix must be 'key' or 'query', got {fix!r}")
    ridge = _check_ridge(ridge)
    if ridge == 0.0 or math.isinf(ridge):
        raise ValueError("the penalty objective is defined for 0 < ridge < inf only")
    _check_heads(n_heads, n_kv_heads)
    if not (new.shape == pre.shape == post.shape):
        raise ValueError("new, pre and post must have one shape")
    f64 = torch.float64
    fixed = fixed_pre.detach().to("cpu", f64)
    x, p0, p1 = (t.detach().to("cpu", f64) for t in (new, pre, post))
    if fix == "key":
        q_shape, k_shape = x.shape, fixed.shape
    else:
        q_shape, k_shape = fixed.shape, x.shape
    d_h = _check_shapes(q_shape[0], k_shape[0], q_shape[1], k_shape[1], n_heads, n_kv_heads)
    g = _grams(fixed.unsqueeze(0), fix, n_heads, n_kv_heads, d_h)
    lam = _lambdas(g, ridge, d_h)
    d = x.shape[1]
    return x.view(-1, d_h, d), p0.view(-1, d_h, d), p1.view(-1, d_h, d), g, lam


def objective(
    new: torch.Tensor,
    pre: torch.Tensor,
    post: torch.Tensor,
    fixed_pre: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    *,
    fix: Fix = "key",
) -> float:
    """The penalty objective QK-Pro minimises, summed over systems (float64).

    ``Σ_s ‖X_s − P_s^post‖²_F + (1/λ_s) ‖(X_s − P_s^pre)ᵀ F_s‖²_F`` where for
    fix="key" the systems are query heads, X = Q, F = K_g^pre; for fix="query"
    they are KV groups, X = K_g and the second term sums over the group's heads
    (F = Q_h^pre). The second term is evaluated as ``⟨Δ, G Δ⟩`` with
    ``Δ = X − P^pre`` — identical to ``‖ΔᵀF‖²`` but with no ``d × d`` matrix.
    ``new``, ``pre`` and ``post`` are the free side; ``fixed_pre`` the held side.
    """
    x, p0, p1, g, lam = _diag_setup(new, pre, post, fixed_pre, n_heads, n_kv_heads, ridge, fix)
    fit = ((x - p1) ** 2).sum(dim=(1, 2))
    delta = x - p0
    pen = (delta * torch.bmm(g, delta)).sum(dim=(1, 2))
    return float((fit + pen / lam.view(-1)).sum())


def stationarity_residual(
    new: torch.Tensor,
    pre: torch.Tensor,
    post: torch.Tensor,
    fixed_pre: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    ridge: float,
    *,
    fix: Fix = "key",
) -> float:
    """Relative residual of ``(G + λI) X = λ P^post + G P^pre`` over all systems.

    ``‖(G+λI)X − (λP^post + G P^pre)‖_F / ‖λP^post + G P^pre‖_F`` in float64:
    0 for the exact minimiser, about the compute precision for a computed one.
    """
    x, p0, p1, g, lam = _diag_setup(new, pre, post, fixed_pre, n_heads, n_kv_heads, ridge, fix)
    rhs = lam * p1 + torch.bmm(g, p0)
    res = torch.bmm(g, x) + lam * x - rhs
    denom = float(torch.linalg.vector_norm(rhs))
    num = float(torch.linalg.vector_norm(res))
    return num / denom if denom > 0 else num


# --------------------------------------------------------------------------- cross-gram form
#
# The second reading of the paper's Appendix N (``pro --form cross-gram``): constrain the d_h × d_h
# cross-Gram ``Q_h K_gᵀ`` to PRE's instead of relaxing the d × d bilinear form with a ridge. The
# smallest change of the free side that meets the constraint moves each row of the difference
# ``P_pre − P_post`` onto the row space of the fixed block; see docs/qk-pro.md ("Cross-gram form").


def row_space_basis(blocks: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the row space of each ``(r, d)`` block of ``(S, r, d)``.

    Returns ``(S, r, d)`` whose rows are the right singular vectors of each block, with the rows
    beyond the block's numerical rank set to zero, so that ``Vᵀ V`` (never formed) is the
    orthogonal projector ``Fᵀ (F Fᵀ)⁺ F`` onto the row space even when ``F`` is rank-deficient.
    The SVD of the block is used rather than the pseudo-inverse of ``F Fᵀ``: it does not square
    the condition number. The rank cut-off is NumPy's ``matrix_rank`` default,
    ``σ_max · max(r, d) · eps``.
    """
    _, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    r, d = blocks.shape[-2], blocks.shape[-1]
    tol = s[..., :1] * (max(r, d) * torch.finfo(blocks.dtype).eps)
    keep = (s > tol) & (s > 0)
    return vh * keep.unsqueeze(-1).to(vh.dtype)


def _cg_layer(
    fix: Fix,
    free_pre: torch.Tensor,
    free_post: torch.Tensor,
    fixed_pre: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The cross-gram solution for one layer's free side, in ``dtype`` on the inputs' device."""
    d = free_pre.shape[1]
    per = n_heads // n_kv_heads
    if fix == "key":
        d_h = free_pre.shape[0] // n_heads
        # One constraint block per KV group (K_g); every head of the group uses its basis.
        basis = row_space_basis(fixed_pre.to(dtype).view(n_kv_heads, d_h, d))
        basis = basis.repeat_interleave(per, dim=0)
        n_free = n_heads
    else:
        d_h = free_pre.shape[0] // n_kv_heads
        # K_g must keep its cross-Gram with every query head that reads it: stack the group's Q_h.
        basis = row_space_basis(fixed_pre.to(dtype).view(n_kv_heads, per * d_h, d))
        n_free = n_kv_heads
    post = free_post.to(dtype).view(n_free, d_h, d)
    diff = free_pre.to(dtype, copy=True).view(n_free, d_h, d)
    diff.sub_(post)  # D = P_pre − P_post, exact: both upcast before subtracting
    coords = torch.bmm(diff, basis.transpose(1, 2))  # (n_free, d_h, r): D's rows in the basis
    return torch.baddbmm(post, coords, basis).view(n_free * d_h, d)  # P_post + D·P


def solve_cross_gram_batched(
    fix: Fix,
    free_pre: LayerStack,
    free_post: LayerStack,
    fixed_pre: LayerStack,
    n_heads: int,
    n_kv_heads: int,
    *,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """QK-Pro's cross-gram form for many layers: the free side closest to POST whose cross-Gram
    with the fixed (PRE) side equals PRE's.

    ``fix="key"``: per query head ``Q_h = Q_h^post + (Q_h^pre − Q_h^post) K_gᵀ (K_g K_gᵀ)⁺ K_g``
    with ``K_g = K_g^pre``, so that ``Q_h K_gᵀ = Q_h^pre K_gᵀ``. ``fix="query"``: per KV group
    ``K_g = K_g^post + (K_g^pre − K_g^post) Q_gᵀ (Q_g Q_gᵀ)⁺ Q_g`` where ``Q_g`` stacks the PRE
    query heads that read the group, so that ``Q_h K_gᵀ = Q_h K_g^preᵀ`` for each of them. No
    ``d × d`` matrix is formed: the projector is applied as ``(D Vᵀ) V`` with ``V`` an orthonormal
    basis of the fixed block's row space (:func:`row_space_basis`), which also handles
    rank-deficient blocks (pseudo-inverse). Inputs are ``(L, rows, d)`` tensors or sequences of
    ``L`` 2-D tensors in any float dtype; the result is ``(L, free_rows, d)`` on the compute
    device, float64 on CPU and float32 on CUDA unless ``out_dtype`` says otherwise. Layers are
    solved one at a time, so memory holds one layer's work on top of the inputs.
    """
    if fix not in ("key", "query"):
        raise ValueError(f"fix must be 'key' or 'query', got {fix!r}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv_heads} KV groups")
    dev = resolve_device(device)
    dtype = compute_dtype or compute_dtype_for(dev)  # as the ridge form chooses it
    fp = list(free_pre.unbind(0) if isinstance(free_pre, torch.Tensor) else free_pre)
    fq = list(free_post.unbind(0) if isinstance(free_post, torch.Tensor) else free_post)
    fx = list(fixed_pre.unbind(0) if isinstance(fixed_pre, torch.Tensor) else fixed_pre)
    if not fp or not (len(fp) == len(fq) == len(fx)):
        raise ValueError(f"layer counts differ: {len(fp)}, {len(fq)} and {len(fx)}")
    q_heads, k_heads = (n_heads, n_kv_heads) if fix == "key" else (n_kv_heads, n_heads)
    out: list[torch.Tensor] = []
    for i, (a, b, c) in enumerate(zip(fp, fq, fx)):
        if a.dim() != 2 or a.shape != b.shape or c.dim() != 2 or c.shape[1] != a.shape[1]:
            raise ValueError(
                f"layer {i}: free side {tuple(a.shape)} / {tuple(b.shape)} and fixed side "
                f"{tuple(c.shape)} do not fit together"
            )
        if (
            a.shape[0] % q_heads
            or c.shape[0] % k_heads
            or a.shape[0] // q_heads != (c.shape[0] // k_heads)
        ):
            raise ValueError(
                f"layer {i}: {a.shape[0]} free rows and {c.shape[0]} fixed rows do not split into "
                f"{n_heads} query heads over {n_kv_heads} KV groups of one head size"
            )
        if not all(t.is_floating_point() for t in (a, b, c)):
            raise ValueError("weights must be floating point")
        fixed = c.to(dev)
        if not bool(torch.isfinite(fixed).all()):
            raise ValueError("the fixed side holds non-finite values (inf/NaN); cannot solve")
        x = _cg_layer(fix, a.to(dev), b.to(dev), fixed, n_heads, n_kv_heads, dtype)
        out.append(x.to(out_dtype) if out_dtype is not None else x)
    return torch.stack(out)


def solve_cross_gram(
    fix: Fix,
    free_pre: torch.Tensor,
    free_post: torch.Tensor,
    fixed_pre: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    *,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`solve_cross_gram_batched` for one layer's 2-D weights."""
    return solve_cross_gram_batched(
        fix,
        [free_pre],
        [free_post],
        [fixed_pre],
        n_heads,
        n_kv_heads,
        device=device,
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
    )[0]
