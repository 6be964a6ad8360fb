"""Weight drift between PRE and POST, per projection, per head, and of the routing form Q_hᵀK_g.

Why these numbers: the paper's routing/extraction decoupling (Section 5) says CoT-SFT erodes W_Q and W_K
(where a head attends) while W_V and W_O (what it reads) keep improving. The plain relative drift
‖ΔW‖_F/‖W‖_F of each projection is the first look; the *routing drift* of a head,

    ‖Q_hᵀK_g(post) − Q_hᵀK_g(pre)‖_F / ‖Q_hᵀK_g(pre)‖_F,

measures the change of the bilinear form that actually makes the logits (``x_iᵀ Q_hᵀ K_g x_j``), so a
rotation that moves Q and K together without changing the logits scores zero. The principal angles
between PRE's and POST's key row spaces say whether the keys now *look at other directions* of the
residual stream, or only rescale inside the same subspace.

Everything is computed from weights only, streaming one KV group (or a bounded chunk of rows) at a
time, in float64 on the CPU. The d×d routing matrices are never formed: with G_X = X Xᵀ (d_h×d_h)
and ΔQ = Q₁ − Q₀, ΔK = K₁ − K₀,

    Q₁ᵀK₁ − Q₀ᵀK₀ = ΔQᵀK₁ + Q₀ᵀΔK
    ‖ΔQᵀK₁ + Q₀ᵀΔK‖² = tr(G_ΔQ G_K₁) + tr(G_Q₀ G_ΔK) + 2 tr(ΔQ Q₀ᵀ · ΔK K₁ᵀ)
    ‖Q₀ᵀK₀‖²        = tr(G_Q₀ G_K₀)

using ‖AᵀB‖_F² = tr(AAᵀ BBᵀ) and ⟨AᵀB, CᵀD⟩ = tr(A Cᵀ D Bᵀ). Writing the difference through ΔQ and
ΔK (rather than ‖Q₁ᵀK₁‖² − 2⟨·,·⟩ + ‖Q₀ᵀK₀‖²) keeps it accurate when the drift is tiny: no two large
numbers are subtracted. Cost per head: O(d_h² d) instead of O(d²·d_h).

What is left out, on purpose: RoPE (it rotates q and k by the same position-dependent orthogonal maps,
so the form is the position-free part of the logit), the 1/√d_h scale (it cancels in a ratio), and
q/k norms (per-head RMSNorms act between the projection and the logit; their own weight drift is
reported beside the projections, as ``norm_rel_drift``). Q/K biases, where a model has them, are
folded into the routing form as one more input column (the form then acts on ``[x; 1]``).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, PlanError
from ..families import TARGETS, Kind, RoutingTensor, layer_map, text_config
from ..families.base import head_dim
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT_DTYPES
from ..io.tensors import read_rows

RowRanges = Sequence[Sequence[int]]
CHUNK_BYTES = 32 << 20  # float64 bytes of one side read at a time for whole-tensor norms

# -- pure math ------------------------------------------------------------------------------------


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` over the last two axes: a d_h×d_h Gram matrix per head."""
    return x @ x.transpose(-1, -2)


def routing_drift_sq(
    q0: torch.Tensor, q1: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖Q₁ᵀK₁ − Q₀ᵀK₀‖_F²`` and ``‖Q₀ᵀK₀‖_F²`` per head, through d_h×d_h Grams only.

    ``q0``, ``q1``: ``[heads, d_h, d]`` (the query heads of one KV group, PRE and POST);
    ``k0``, ``k1``: ``[d_h, d]`` (the group's key head). Returns two ``[heads]`` tensors.
    """
    dq, dk = q1 - q0, k1 - k0
    g_k1, g_dk, g_k0 = gram(k1), gram(dk), gram(k0)
    g_q0 = gram(q0)
    c_q = dq @ q0.transpose(-1, -2)  # [heads, d_h, d_h] = ΔQ Q₀ᵀ
    c_k = dk @ k1.transpose(-1, -2)  # [d_h, d_h] = ΔK K₁ᵀ
    num = (
        (gram(dq) * g_k1).sum((-1, -2))
        + (g_q0 * g_dk).sum((-1, -2))
        + 2 * (c_q * c_k.transpose(-1, -2)).sum((-1, -2))  # tr(C_q C_k) = Σ C_q ∘ C_kᵀ
    )
    den = (g_q0 * g_k0).sum((-1, -2))
    return num.clamp(min=0), den


def ratio(num_sq: float, den_sq: float) -> float | None:
    """``√num / √den``; ``None`` (JSON null) where the reference is zero and the ratio undefined."""
    if den_sq <= 0:
        return 0.0 if num_sq <= 0 else None
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def row_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of ``x``, dropping numerically null directions."""
    if x.numel() == 0:
        return x.new_zeros((0, x.shape[-1]))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return x.new_zeros((0, x.shape[-1]))
    tol = float(s[0]) * max(x.shape) * torch.finfo(x.dtype).eps
    return vh[s > tol]


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the row spaces of ``a`` and ``b``.

    Cosines come from the SVD of ``U_a U_bᵀ`` and sines from that of the part of ``U_b`` outside
    span(U_a); ``atan2(sin, cos)`` is accurate for small angles too, where ``arccos`` alone loses
    half the digits (Björck & Golub).
    """
    ua, ub = row_basis(a), row_basis(b)
    if ua.shape[0] < ub.shape[0]:
        ua, ub = ub, ua  # ub is the smaller space: its dimension is the number of angles
    if ub.shape[0] == 0:
        return a.new_zeros(0)
    cos = torch.linalg.svdvals(ub @ ua.T).clamp(0, 1)  # descending: smallest angle first
    resid = ub - (ub @ ua.T) @ ua
    sin = torch.linalg.svdvals(resid).clamp(0, 1).flip(0)  # ascending: smallest angle first
    return torch.atan2(sin, cos)


def angle_summary(theta: torch.Tensor) -> dict[str, float | None]:
    """Largest and mean principal angle in degrees (``None`` where there is no angle)."""
    if theta.numel() == 0:
        return {"max_deg": None, "mean_deg": None}
    deg = torch.rad2deg(theta)
    return {"max_deg": float(deg.max()), "mean_deg": float(deg.mean())}


# -- which tensors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One tensor's rows that belong to a target (a fused or gated tensor gives only its rows)."""

    name: str
    rows: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return sum(b - a for a, b in self.rows)


@dataclass
class LayerSpec:
    """The weight, bias and q/k norm tensors of one layer, by target."""

    layer: int
    kind: str
    weights: dict[str, list[Part]] = field(default_factory=dict)
    biases: dict[str, list[Part]] = field(default_factory=dict)
    norms: dict[str, list[Part]] = field(default_factory=dict)


_FALLBACK = re.compile(r"\.(q|k|v|o)_proj\.weight$|\.(o)ut_proj\.weight$")


def _fallback_tensors(ckpt: Checkpoint, prefix: str, layer: int) -> list[RoutingTensor]:
    """``--all-layers`` for layers an adapter does not describe: plain ``*.{q,k,v,o}_proj`` names."""
    head = f"{prefix}{layer}."
    found = []
    for name, info in ckpt.tensors.items():
        if not name.startswith(head):
            continue
        m = _FALLBACK.search(name)
        if m:
            target = m.group(1) or m.group(2)
            found.append(RoutingTensor(name, layer, target, "weight", ((0, info.rows),)))
    return found


def layer_specs(ckpt: Checkpoint, all_layers: bool = False) -> tuple[list[LayerSpec], list[str]]:
    """Every softmax-attention layer (and, with ``all_layers``, every other layer with Q and K)."""
    lmap = layer_map(ckpt.config, ckpt.tensors)
    notes: list[str] = []
    specs = []
    for i, kind in enumerate(lmap.kinds):
        if kind is Kind.OTHER and not all_layers:
            continue
        try:
            found = [rt for rts in lmap.by_target(i, TARGETS).values() for rt in rts]
        except (PlanError, ConfigError):
            if kind is not Kind.OTHER:
                raise
            found = _fallback_tensors(ckpt, lmap.prefix, i)
        spec = LayerSpec(i, kind.value)
        for rt in found:
            part = Part(rt.name, tuple((int(a), int(b)) for a, b in rt.rows))
            if rt.role == "weight":
                spec.weights.setdefault(rt.target, []).append(part)
            elif rt.role == "bias":
                spec.biases.setdefault(rt.target, []).append(part)
            elif rt.role == "norm" and rt.target in ("q", "k"):
                spec.norms.setdefault(rt.target, []).append(part)
        if kind is Kind.OTHER and not ("q" in spec.weights and "k" in spec.weights):
            continue
        specs.append(spec)
    if lmap.family.no_head_pairs:
        notes.append(
            f"{lmap.family.name}: keys are built from several tensors "
            f"({lmap.family.no_head_pairs}), so per-head and routing drift are left out where a "
            "layer has no single W_Q and W_K; whole-projection drift is still reported"
        )
    return specs, notes


# -- streaming reads ------------------------------------------------------------------------------


def logical_rows(rows: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The physical row ranges of logical rows ``[start, stop)`` of a selection (rows concatenated)."""
    out = []
    pos = 0
    for a, b in rows:
        n = b - a
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += n
    return out


class Reader:
    """Reads the same rows of a tensor from PRE and POST as float64, after checking they match."""

    def __init__(self, pre: Checkpoint, post: Checkpoint) -> None:
        self.pre, self.post = pre, post

    def check(self, name: str) -> None:
        a = self.pre.info(name)
        if name not in self.post.tensors:
            raise PlanError(f"{self.post.root}: no tensor '{name}' to compare with PRE")
        b = self.post.info(name)
        if a.shape != b.shape:
            raise PlanError(f"'{name}': shape {list(a.shape)} in PRE but {list(b.shape)} in POST")
        for info, who in ((a, "PRE"), (b, "POST")):
            if info.dtype not in FLOAT_DTYPES:
                raise PlanError(f"'{name}' is {info.dtype} in {who}: drift needs float weights")

    def rows(self, part: Part, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        phys = logical_rows(part.rows, start, stop)
        return (
            read_rows(self.pre, part.name, phys, torch.float64),
            read_rows(self.post, part.name, phys, torch.float64),
        )

    def chunks(self, part: Part, unit: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The part's rows in chunks of whole ``unit``-row blocks, each at most ~CHUNK_BYTES."""
        info = self.pre.info(part.name)
        row_bytes = 8 * max(1, math.prod(info.shape[1:]))
        step = max(unit, (CHUNK_BYTES // row_bytes) // unit * unit)
        for start in range(0, part.count, step):
            yield self.rows(part, start, min(part.count, start + step))


def _sq(x: torch.Tensor) -> float:
    return float((x * x).sum())


def _target_whole(reader: Reader, parts: list[Part]) -> dict[str, Any]:
    """Relative drift over all of a target's rows (several tensors: squared norms add)."""
    num = den = 0.0
    for part in parts:
        reader.check(part.name)
        for a, b in reader.chunks(part):
            num += _sq(b - a)
            den += _sq(a)
    return {"rel_drift": ratio(num, den), "heads": None, "tensors": [p.name for p in parts]}


def _heads_by_rows(reader: Reader, part: Part, n_heads: int) -> dict[str, Any]:
    """Per-head drift where head ``h`` owns rows ``[h·s, (h+1)·s)`` of the selection."""
    reader.check(part.name)
    size = part.count // n_heads
    nums, dens = [], []
    for a, b in reader.chunks(part, size):
        d = (b - a).reshape(-1, size, *a.shape[1:])
        r = a.reshape(-1, size, *a.shape[1:])
        nums += (d * d).flatten(1).sum(1).tolist()
        dens += (r * r).flatten(1).sum(1).tolist()
    return {
        "rel_drift": ratio(sum(nums), sum(dens)),
        "heads": [ratio(n, d) for n, d in zip(nums, dens)],
        "tensors": [part.name],
    }


def _heads_by_cols(reader: Reader, part: Part, n_heads: int) -> dict[str, Any]:
    """Per-head drift of o_proj, whose head ``h`` is the column block ``[h·s, (h+1)·s)``."""
    reader.check(part.name)
    nums = torch.zeros(n_heads, dtype=torch.float64)
    dens = torch.zeros(n_heads, dtype=torch.float64)
    for a, b in reader.chunks(part):
        d = (b - a).reshape(a.shape[0], n_heads, -1)
        r = a.reshape(a.shape[0], n_heads, -1)
        nums += (d * d).sum((0, 2))
        dens += (r * r).sum((0, 2))
    return {
        "rel_drift": ratio(float(nums.sum()), float(dens.sum())),
        "heads": [ratio(float(n), float(d)) for n, d in zip(nums, dens)],
        "tensors": [part.name],
    }


def _guess_head_dim(cfg: dict[str, Any], q_rows: int) -> int | None:
    """The head size: config ``head_dim`` (or hidden/heads), else rows / heads, if it divides."""
    candidates = []
    with contextlib.suppress(ConfigError):
        candidates.append(head_dim(cfg))
    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0 and q_rows % heads == 0:
        candidates.append(q_rows // heads)
    for hd in candidates:
        if hd > 0 and q_rows % hd == 0:
            return hd
    return None


# -- one layer ------------------------------------------------------------------------------------


def layer_drift(reader: Reader, spec: LayerSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """Every number the ``drift`` command reports for one layer."""
    out: dict[str, Any] = {"layer": spec.layer, "kind": spec.kind}
    w = spec.weights
    single = {t: w[t][0] for t in TARGETS if len(w.get(t, [])) == 1}
    hd = n_q = n_kv = None
    if "q" in single and "k" in single:
        hd = _guess_head_dim(cfg, single["q"].count)
        if hd and single["k"].count % hd == 0:
            n_q, n_kv = single["q"].count // hd, single["k"].count // hd
            if n_kv == 0 or n_q % n_kv:
                n_q = n_kv = None
    routing = None
    if n_q and n_kv and hd:
        b = spec.biases
        qb = b["q"][0] if len(b.get("q", [])) == 1 else None
        kb = b["k"][0] if len(b.get("k", [])) == 1 else None
        if qb is not None and qb.count != single["q"].count:
            qb = None
        if kb is not None and kb.count != single["k"].count:
            kb = None
        out["q"], out["k"], routing, angles = _qk_groups(
            reader, single["q"], single["k"], n_q, n_kv, qb, kb
        )
        out["k_subspace"] = angles
    else:
        for t in ("q", "k"):
            if t in w:
                out[t] = _target_whole(reader, w[t])
    if "v" in w:
        v = single.get("v")
        if v is not None and n_kv and v.count % n_kv == 0:
            out["v"] = _heads_by_rows(reader, v, n_kv)
        else:
            out["v"] = _target_whole(reader, w["v"])
    if "o" in w:
        o = single.get("o")
        cols = reader.pre.info(o.name).shape[1] if o is not None else 0
        if o is not None and n_q and len(reader.pre.info(o.name).shape) == 2 and cols % n_q == 0:
            out["o"] = _heads_by_cols(reader, o, n_q)
        else:
            out["o"] = _target_whole(reader, w["o"])
    for key, table in (("bias_rel_drift", spec.biases), ("norm_rel_drift", spec.norms)):
        for t, parts in table.items():
            if t in out:
                num = den = 0.0
                for part in parts:
                    reader.check(part.name)
                    old, new = reader.rows(part, 0, part.count)
                    num, den = num + _sq(new - old), den + _sq(old)
                out[t][key] = ratio(num, den)
    if routing is not None:
        vals = [x for x in routing if x is not None]
        out["routing_drift"] = {
            "mean": sum(vals) / len(vals) if vals else None,
            "max": max(vals) if vals else None,
            "heads": routing,
        }
        out["heads"] = {"query": n_q, "kv": n_kv, "head_dim": hd}
    else:
        out["routing_drift"] = None
    return out


def _with_bias(
    reader: Reader, w: tuple[torch.Tensor, torch.Tensor], bias: Part | None, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[W | b]``: the bias as one more input column, so the form acts on ``[x; 1]``.

    A side without a bias gets a zero column, which changes nothing for it.
    """
    if bias is None:
        zero = w[0].new_zeros(w[0].shape[0], 1)
        return torch.cat([w[0], zero], 1), torch.cat([w[1], zero], 1)
    b0, b1 = reader.rows(bias, lo, hi)
    return torch.cat([w[0], b0[:, None]], 1), torch.cat([w[1], b1[:, None]], 1)


def _qk_groups(
    reader: Reader,
    q: Part,
    k: Part,
    n_q: int,
    n_kv: int,
    q_bias: Part | None = None,
    k_bias: Part | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[float | None], dict[str, Any]]:
    """Q and K per head, routing per query head, and key-subspace angles, one KV group at a time.

    With q/k biases the routing form is that of ``[W | b]`` on ``[x; 1]``: a bias moves where a head
    looks as surely as a weight does (with RoPE, a shared q/k bias alone makes a head local). The
    per-projection drift and the key-subspace angles stay on the weights; the biases' own drift is
    reported as ``bias_rel_drift``.
    """
    reader.check(q.name)
    reader.check(k.name)
    for b in (q_bias, k_bias):
        if b is not None:
            reader.check(b.name)
    biased = q_bias is not None or k_bias is not None
    hd = k.count // n_kv
    per = n_q // n_kv
    q_num, q_den, k_num, k_den, routing = [], [], [], [], []
    groups = []
    k0_all, k1_all = [], []
    width = math.prod(reader.pre.info(k.name).shape[1:])
    keep_all = n_kv * hd < width  # a full-rank key space has no angle to report
    for g in range(n_kv):
        q0, q1 = reader.rows(q, g * per * hd, (g + 1) * per * hd)
        k0, k1 = reader.rows(k, g * hd, (g + 1) * hd)
        q0, q1 = q0.reshape(per, hd, -1), q1.reshape(per, hd, -1)
        k0, k1 = k0.reshape(hd, -1), k1.reshape(hd, -1)
        dq, dk = q1 - q0, k1 - k0
        q_num += (dq * dq).sum((1, 2)).tolist()
        q_den += (q0 * q0).sum((1, 2)).tolist()
        k_num.append(_sq(dk))
        k_den.append(_sq(k0))
        if biased:
            qa0, qa1 = _with_bias(
                reader,
                (q0.reshape(per * hd, -1), q1.reshape(per * hd, -1)),
                q_bias,
                g * per * hd,
                (g + 1) * per * hd,
            )
            ka0, ka1 = _with_bias(reader, (k0, k1), k_bias, g * hd, (g + 1) * hd)
            num, den = routing_drift_sq(
                qa0.reshape(per, hd, -1), qa1.reshape(per, hd, -1), ka0, ka1
            )
        else:
            num, den = routing_drift_sq(q0, q1, k0, k1)
        routing += [ratio(float(n), float(d)) for n, d in zip(num, den)]
        groups.append(angle_summary(principal_angles(k0, k1)))
        if keep_all:
            k0_all.append(k0)
            k1_all.append(k1)
    layer_angles = (
        angle_summary(principal_angles(torch.cat(k0_all), torch.cat(k1_all)))
        if keep_all
        else {"max_deg": None, "mean_deg": None}
    )
    q_out = {
        "rel_drift": ratio(sum(q_num), sum(q_den)),
        "heads": [ratio(n, d) for n, d in zip(q_num, q_den)],
        "tensors": [q.name],
    }
    k_out = {
        "rel_drift": ratio(sum(k_num), sum(k_den)),
        "heads": [ratio(n, d) for n, d in zip(k_num, k_den)],
        "tensors": [k.name],
    }
    angles = {"layer": layer_angles, "groups": groups}
    return q_out, k_out, routing, angles


# -- the whole model ------------------------------------------------------------------------------


def drift_report(pre: Checkpoint, post: Checkpoint, all_layers: bool = False) -> dict[str, Any]:
    """The ``drift`` command's JSON document (see docs/diagnostics.md for its fields)."""
    specs, notes = layer_specs(pre, all_layers)
    pre_map = layer_map(pre.config)
    if pre_map.kinds != layer_map(post.config).kinds:
        notes.append("PRE and POST configs give different layer maps; PRE's is used")
    if not specs:
        raise PlanError(
            f"{pre.root}: no softmax-attention layer to compare",
            hint="--all-layers also compares other layers that have q/k projections",
        )
    cfg = dict(text_config(pre.config))
    reader = Reader(pre, post)
    layers = [layer_drift(reader, spec, cfg) for spec in specs]
    ranked = [x for x in layers if x["routing_drift"] and x["routing_drift"]["mean"] is not None]
    ranked.sort(key=lambda x: -x["routing_drift"]["mean"])
    return {
        "pre": str(pre.root),
        "post": str(post.root),
        "adapter": pre_map.family.name,
        "layers": layers,
        "ranking": [
            {
                "layer": x["layer"],
                "kind": x["kind"],
                "routing_drift": x["routing_drift"]["mean"],
                "max_head_routing_drift": x["routing_drift"]["max"],
            }
            for x in ranked
        ],
        "notes": notes,
    }
