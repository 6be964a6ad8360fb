"""Tests for qkrestore.qkpro.closed_form: the QK-Pro closed form, its limits and its batching.

The reference implementations here are written independently of the module,
in numpy float64, one head (or one KV group) at a time, straight from the
formulas in docs/qk-pro.md.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkrestore.io.runtime import resolve_device
from qkrestore.qkpro.closed_form import objective, solve, stationarity_residual

FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None)
RIDGES = st.sampled_from([1e-4, 1e-2, 0.3, 1.0, 2.5, 50.0])
METHODS = ["solve", "inverse"]


def make_layer(
    seed: int,
    n_kv: int,
    rep: int,
    d_h: int,
    d: int,
    *,
    shift: float = 0.3,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (q_pre, q_post, k_pre, k_post); KV groups get different scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    n_heads = n_kv * rep
    q_pre = torch.randn(n_heads * d_h, d, generator=g, dtype=torch.float64)
    q_post = q_pre + shift * torch.randn(n_heads * d_h, d, generator=g, dtype=torch.float64)
    k_pre = torch.randn(n_kv * d_h, d, generator=g, dtype=torch.float64)
    # Make each KV group genuinely different so that a wrong head→group map shows up.
    scales = torch.linspace(0.5, 3.0, n_kv, dtype=torch.float64).repeat_interleave(d_h)
    k_pre = k_pre * scales[:, None] + torch.arange(n_kv * d_h, dtype=torch.float64)[:, None] / d
    k_post = k_pre + shift * torch.randn(n_kv * d_h, d, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q_pre, q_post, k_pre, k_post))  # type: ignore[return-value]


def ref_fix_key(q_pre, q_post, k_pre, n_heads, n_kv, ridge) -> np.ndarray:
    """Per-head loop, numpy float64: Q_h = Q_h^post + G (G + λI)^-1 (Q_h^pre − Q_h^post)."""
    q0 = q_pre.double().numpy()
    q1 = q_post.double().numpy()
    k0 = k_pre.double().numpy()
    d_h = q0.shape[0] // n_heads
    out = np.empty_like(q0)
    for h in range(n_heads):
        grp = h // (n_heads // n_kv)
        kg = k0[grp * d_h : (grp + 1) * d_h]
        gm = kg @ kg.T
        lam = ridge * np.trace(gm) / d_h
        rows = slice(h * d_h, (h + 1) * d_h)
        out[rows] = q1[rows] + gm @ np.linalg.solve(gm + lam * np.eye(d_h), q0[rows] - q1[rows])
    return out


def ref_fix_query(k_pre, k_post, q_pre, n_heads, n_kv, ridge) -> np.ndarray:
    """Per-group loop, numpy float64, with G_g = Σ_{h∈g} Q_h^pre Q_h^preᵀ."""
    k0 = k_pre.double().numpy()
    k1 = k_post.double().numpy()
    q0 = q_pre.double().numpy()
    d_h = k0.shape[0] // n_kv
    out = np.empty_like(k0)
    for grp in range(n_kv):
        gm = np.zeros((d_h, d_h))
        for h in range(n_heads):
            if h // (n_heads // n_kv) == grp:
                qh = q0[h * d_h : (h + 1) * d_h]
                gm += qh @ qh.T
        lam = ridge * np.trace(gm) / d_h
        rows = slice(grp * d_h, (grp + 1) * d_h)
        out[rows] = k1[rows] + gm @ np.linalg.solve(gm + lam * np.eye(d_h), k0[rows] - k1[rows])
    return out


def rel(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def logits(q: torch.Tensor, k: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Stack of Q_hᵀ K_g (d × d) for every head: what attention actually sees."""
    d_h = q.shape[0] // n_heads
    rep = n_heads // n_kv
    q = q.double()
    k = k.double()
    return torch.stack(
        [
            q[h * d_h : (h + 1) * d_h].T @ k[(h // rep) * d_h : (h // rep + 1) * d_h]
            for h in range(n_heads)
        ]
    )


shapes = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 3),  # n_kv
    st.integers(1, 3),  # rep = n_heads // n_kv
    st.integers(1, 6),  # d_h
    st.integers(1, 12),  # d (may be < d_h: singular G)
)


# --------------------------------------------------------------------------- closed form


@FAST
@given(shapes, RIDGES, st.sampled_from(METHODS))
def test_fix_key_matches_per_head_numpy_reference(shape, ridge, method):
    seed, n_kv, rep, d_h, d = shape
    q0, q1, k0, _ = make_layer(seed, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    got = solve("key", q0, q1, k0, n_heads, n_kv, ridge, method=method)
    assert got.dtype == torch.float64 and got.shape == q0.shape
    assert rel(got, ref_fix_key(q0, q1, k0, n_heads, n_kv, ridge)) < 1e-9


@FAST
@given(shapes, RIDGES, st.sampled_from(METHODS))
def test_fix_query_matches_per_group_numpy_reference(shape, ridge, method):
    seed, n_kv, rep, d_h, d = shape
    q0, _, k0, k1 = make_layer(seed, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    got = solve("query", k0, k1, q0, n_heads, n_kv, ridge, method=method)
    assert got.dtype == torch.float64 and got.shape == k0.shape
    assert rel(got, ref_fix_query(k0, k1, q0, n_heads, n_kv, ridge)) < 1e-9


@FAST
@given(shapes, RIDGES, st.sampled_from(["key", "query"]))
def test_stationarity_residual_is_zero(shape, ridge, fix):
    seed, n_kv, rep, d_h, d = shape
    q0, q1, k0, k1 = make_layer(seed, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    if fix == "key":
        x = solve("key", q0, q1, k0, n_heads, n_kv, ridge)
        r = stationarity_residual(x, q0, q1, k0, n_heads, n_kv, ridge, fix="key")
        r_post = stationarity_residual(q1, q0, q1, k0, n_heads, n_kv, ridge, fix="key")
    else:
        x = solve("query", k0, k1, q0, n_heads, n_kv, ridge)
        r = stationarity_residual(x, k0, k1, q0, n_heads, n_kv, ridge, fix="query")
        r_post = stationarity_residual(k1, k0, k1, q0, n_heads, n_kv, ridge, fix="query")
    assert r < 1e-10
    assert r_post > 1e-3  # the residual does detect a non-solution


@FAST
@given(shapes, RIDGES, st.sampled_from(["key", "query"]))
def test_beats_random_perturbations(shape, ridge, fix):
    seed, n_kv, rep, d_h, d = shape
    q0, q1, k0, k1 = make_layer(seed, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    if fix == "key":
        args = (q0, q1, k0)
        x = solve("key", *args, n_heads, n_kv, ridge)
    else:
        args = (k0, k1, q0)
        x = solve("query", *args, n_heads, n_kv, ridge)
    best = objective(x, *args, n_heads, n_kv, ridge, fix=fix)
    g = torch.Generator().manual_seed(seed + 1)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(4):
            y = x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
            assert objective(y, *args, n_heads, n_kv, ridge, fix=fix) >= best * (1 - 1e-12)
    # Both endpoints are feasible candidates too, and never better.
    assert objective(args[0], *args, n_heads, n_kv, ridge, fix=fix) >= best * (1 - 1e-12)
    assert objective(args[1], *args, n_heads, n_kv, ridge, fix=fix) >= best * (1 - 1e-12)


def test_objective_second_term_equals_dxd_form():
    """⟨Δ, GΔ⟩ (what the module computes) equals ‖ΔᵀK‖², the d × d definition."""
    n_kv, rep, d_h, d, ridge = 2, 2, 3, 5, 0.7
    q0, q1, k0, _ = make_layer(7, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    x = q1 + 0.1
    expected = 0.0
    for h in range(n_heads):
        grp = h // rep
        kg = k0[grp * d_h : (grp + 1) * d_h]
        lam = ridge * float(torch.trace(kg @ kg.T)) / d_h
        rows = slice(h * d_h, (h + 1) * d_h)
        fit = float(((x[rows] - q1[rows]) ** 2).sum())
        pen = float(((x[rows] - q0[rows]).T @ kg).pow(2).sum())  # d × d, fine at this size
        expected += fit + pen / lam
    got = objective(x, q0, q1, k0, n_heads, n_kv, ridge, fix="key")
    assert math.isclose(got, expected, rel_tol=1e-12)


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("fix", ["key", "query"])
def test_ridge_to_zero_gives_pre(fix):
    n_kv, rep, d_h, d = 2, 3, 4, 16
    q0, q1, k0, k1 = make_layer(1, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    if fix == "key":
        near = solve("key", q0, q1, k0, n_heads, n_kv, 1e-10)
        exact = solve("key", q0, q1, k0, n_heads, n_kv, 0.0)
        pre = q0
    else:
        near = solve("query", k0, k1, q0, n_heads, n_kv, 1e-10)
        exact = solve("query", k0, k1, q0, n_heads, n_kv, 0.0)
        pre = k0
    assert rel(near, pre) < 1e-5
    assert torch.equal(exact, pre.double())


@pytest.mark.parametrize("fix", ["key", "query"])
def test_ridge_to_infinity_gives_post(fix):
    n_kv, rep, d_h, d = 2, 2, 4, 16
    q0, q1, k0, k1 = make_layer(2, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    if fix == "key":
        far = solve("key", q0, q1, k0, n_heads, n_kv, 1e10)
        inf = solve("key", q0, q1, k0, n_heads, n_kv, math.inf)
        post = q1
    else:
        far = solve("query", k0, k1, q0, n_heads, n_kv, 1e10)
        inf = solve("query", k0, k1, q0, n_heads, n_kv, math.inf)
        post = k1
    assert rel(far, post) < 1e-5
    assert torch.equal(inf, post.double())


def test_ridge_zero_is_exact_for_bf16_inputs():
    q0, q1, k0, _ = make_layer(3, 2, 2, 4, 8, dtype=torch.bfloat16)
    out = solve("key", q0, q1, k0, 4, 2, 0.0)
    assert out.dtype == torch.float64
    assert torch.equal(out.to(torch.bfloat16), q0)


def test_ridge_sweep_is_monotone():
    """Smaller ridge: logits closer to PRE's, weights further from POST's."""
    n_kv, rep, d_h, d = 2, 2, 4, 10
    q0, q1, k0, _ = make_layer(4, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    target = logits(q0, k0, n_heads, n_kv)
    drift, move = [], []
    for ridge in (1e3, 10.0, 1.0, 0.1, 1e-3):
        x = solve("key", q0, q1, k0, n_heads, n_kv, ridge)
        drift.append(float((logits(x, k0, n_heads, n_kv) - target).norm()))
        move.append(float((x - q1).norm()))
    assert all(a > b for a, b in itertools.pairwise(drift))
    assert all(a < b for a, b in itertools.pairwise(move))


def test_singular_gram_small_ridge_restores_logits():
    """d < d_h makes G = K Kᵀ singular; the logits still go back to PRE's as ridge → 0."""
    n_kv, rep, d_h, d = 2, 2, 6, 3
    q0, q1, k0, _ = make_layer(5, n_kv, rep, d_h, d)
    n_heads = n_kv * rep
    x = solve("key", q0, q1, k0, n_heads, n_kv, 1e-9)
    target = logits(q0, k0, n_heads, n_kv)
    assert rel(logits(x, k0, n_heads, n_kv), target) < 1e-6
    # Off G's range (directions K cannot see) the solution keeps POST's weights.
    assert rel(x, ref_fix_key(q0, q1, k0, n_heads, n_kv, 1e-9)) < 1e-6


def test_zero_key_group_gives_post():
    """An all-zero K_g imposes no constraint: its heads keep POST's query weights."""
    n_kv, rep, d_h, d = 2, 2, 3, 6
    q0, q1, k0, _ = make_layer(6, n_kv, rep, d_h, d)
    k0[:d_h] = 0.0  # group 0 dead
    x = solve("key", q0, q1, k0, n_kv * rep, n_kv, 0.1)
    assert torch.equal(x[: rep * d_h], q1[: rep * d_h])
    # The live group is solved as if it were alone.
    alone = solve("key", q0[rep * d_h :], q1[rep * d_h :], k0[d_h:], rep, 1, 0.1)
    assert torch.equal(x[rep * d_h :], alone)


def test_ridge_is_scale_free():
    """λ = ridge·trace(G)/d_h: scaling the held side does not change the answer."""
    q0, q1, k0, k1 = make_layer(8, 2, 2, 4, 12)
    a = solve("key", q0, q1, k0, 4, 2, 0.2)
    b = solve("key", q0, q1, 37.0 * k0, 4, 2, 0.2)
    assert rel(b, a) < 1e-12
    c = solve("query", k0, k1, q0, 4, 2, 0.2)
    e = solve("query", k0, k1, 1e-3 * q0, 4, 2, 0.2)
    assert rel(e, c) < 1e-12


# --------------------------------------------------------------------------- GQA


def test_each_head_uses_its_own_kv_group():
    n_kv, rep, d_h, d = 3, 2, 4, 10
    n_heads = n_kv * rep
    q0, q1, k0, _ = make_layer(9, n_kv, rep, d_h, d)
    base = solve("key", q0, q1, k0, n_heads, n_kv, 0.05)
    for grp in range(n_kv):
        k_mod = k0.clone()
        k_mod[grp * d_h : (grp + 1) * d_h] = torch.randn(d_h, d, dtype=torch.float64)
        out = solve("key", q0, q1, k_mod, n_heads, n_kv, 0.05)
        for h in range(n_heads):
            rows = slice(h * d_h, (h + 1) * d_h)
            if h // rep == grp:
                assert not torch.allclose(out[rows], base[rows])
            else:
                assert torch.equal(out[rows], base[rows])


def test_fix_query_group_uses_only_its_heads():
    n_kv, rep, d_h, d = 3, 2, 4, 10
    n_heads = n_kv * rep
    q0, _, k0, k1 = make_layer(10, n_kv, rep, d_h, d)
    base = solve("query", k0, k1, q0, n_heads, n_kv, 0.05)
    q_mod = q0.clone()
    h = 3  # group 1
    q_mod[h * d_h : (h + 1) * d_h] *= -2.0
    out = solve("query", k0, k1, q_mod, n_heads, n_kv, 0.05)
    for grp in range(n_kv):
        rows = slice(grp * d_h, (grp + 1) * d_h)
        if grp == h // rep:
            assert not torch.allclose(out[rows], base[rows])
        else:
            assert torch.equal(out[rows], base[rows])


def test_mha_fix_query_mirrors_fix_key():
    """With one head per group the two problems are the same with Q and K swapped."""
    q0, _, k0, k1 = make_layer(11, 4, 1, 5, 9)
    a = solve("query", k0, k1, q0, 4, 4, 0.3)
    b = solve("key", k0, k1, q0, 4, 4, 0.3)
    assert rel(a, b) < 1e-13


def test_fix_query_restores_logits_of_every_head_in_group():
    n_kv, rep, d_h, d = 2, 3, 4, 16
    n_heads = n_kv * rep
    q0, _, k0, k1 = make_layer(12, n_kv, rep, d_h, d)
    target = logits(q0, k0, n_heads, n_kv)
    before = rel(logits(q0, k1, n_heads, n_kv), target)
    k = solve("query", k0, k1, q0, n_heads, n_kv, 1e-8)
    assert rel(logits(q0, k, n_heads, n_kv), target) < 1e-6 * max(before, 1.0)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("fix", ["key", "query"])
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_layer(fix, as_list, method):
    n_layers, n_kv, rep, d_h, d, ridge = 5, 2, 2, 4, 12, 0.15
    n_heads = n_kv * rep
    layers = [make_layer(100 + i, n_kv, rep, d_h, d) for i in range(n_layers)]
    if fix == "key":
        cols = [[layer[i] for layer in layers] for i in (0, 1, 2)]
        single = [
            solve("key", a, b, c, n_heads, n_kv, ridge) for a, b, c in zip(*cols, strict=True)
        ]
        fn = partial(solve, "key")
    else:
        cols = [[layer[i] for layer in layers] for i in (2, 3, 0)]
        single = [
            solve("query", a, b, c, n_heads, n_kv, ridge) for a, b, c in zip(*cols, strict=True)
        ]
        fn = partial(solve, "query")
    args = cols if as_list else [torch.stack(c) for c in cols]
    # chunk_bytes small enough to force several chunks, one of them partial.
    per_layer = max(c[0].numel() for c in cols) * 8
    for chunk in (None, 2 * per_layer):
        got = fn(*args, n_heads, n_kv, ridge, method=method, chunk_bytes=chunk)
        assert got.shape == (n_layers, *single[0].shape)
        for i in range(n_layers):
            assert rel(got[i], single[i]) < 1e-12


def test_batched_layers_do_not_mix():
    """Each layer's heads see their own layer's K (catches a wrong reshape)."""
    n_kv, rep, d_h, d = 2, 2, 3, 7
    a = make_layer(200, n_kv, rep, d_h, d)
    b = make_layer(201, n_kv, rep, d_h, d)
    got = solve(
        "key",
        torch.stack([a[0], b[0]]),
        torch.stack([a[1], b[1]]),
        torch.stack([a[2], b[2]]),
        4,
        2,
        0.4,
    )
    assert rel(got[0], ref_fix_key(a[0], a[1], a[2], 4, 2, 0.4)) < 1e-12
    assert rel(got[1], ref_fix_key(b[0], b[1], b[2], 4, 2, 0.4)) < 1e-12


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("fix", ["key", "query"])
def test_bf16_inputs(fix):
    n_kv, rep, d_h, d = 2, 4, 8, 32
    n_heads = n_kv * rep
    q0, q1, k0, k1 = make_layer(13, n_kv, rep, d_h, d, dtype=torch.bfloat16)
    if fix == "key":
        out = solve("key", q0, q1, k0, n_heads, n_kv, 0.1)
        ref = ref_fix_key(q0, q1, k0, n_heads, n_kv, 0.1)  # on the bf16 values, in float64
    else:
        out = solve("query", k0, k1, q0, n_heads, n_kv, 0.1)
        ref = ref_fix_query(k0, k1, q0, n_heads, n_kv, 0.1)
    assert out.dtype == torch.float64
    assert rel(out, ref) < 1e-12
    cast = (
        solve("key", q0, q1, k0, n_heads, n_kv, 0.1, out_dtype=torch.bfloat16)
        if fix == "key"
        else solve("query", k0, k1, q0, n_heads, n_kv, 0.1, out_dtype=torch.bfloat16)
    )
    assert cast.dtype == torch.bfloat16
    assert torch.equal(cast, out.to(torch.bfloat16))


def test_float16_and_float32_inputs_and_compute_dtype_override():
    q0, q1, k0, _ = make_layer(14, 2, 2, 4, 12)
    ref = solve("key", q0, q1, k0, 4, 2, 0.3)
    for dt in (torch.float16, torch.float32):
        out = solve("key", q0.to(dt), q1.to(dt), k0.to(dt), 4, 2, 0.3)
        assert out.dtype == torch.float64
        assert rel(out, ref) < 5e-3
    f32 = solve("key", q0, q1, k0, 4, 2, 0.3, compute_dtype=torch.float32)
    assert f32.dtype == torch.float32
    assert rel(f32, ref) < 1e-5


# --------------------------------------------------------------------------- errors


def test_rejects_bad_inputs():
    q0, q1, k0, _ = make_layer(15, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        solve("key", q0, q1, k0, 4, 3, 0.1)
    with pytest.raises(ValueError, match="ridge"):
        solve("key", q0, q1, k0, 4, 2, -1.0)
    with pytest.raises(ValueError, match="ridge"):
        solve("key", q0, q1, k0, 4, 2, float("nan"))
    with pytest.raises(ValueError, match="PRE and POST"):
        solve("key", q0, q1[:-4], k0, 4, 2, 0.1)
    with pytest.raises(ValueError, match="head size mismatch"):
        solve("key", q0, q1, k0[:4], 4, 2, 0.1)
    with pytest.raises(ValueError, match="columns"):
        solve("key", q0, q1, k0[:, :-1], 4, 2, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        solve("key", q0[None], q1, k0, 4, 2, 0.1)
    with pytest.raises(ValueError, match="layers"):
        solve("key", [q0, q0], [q1, q1], [k0], 4, 2, 0.1)
    with pytest.raises(ValueError, match="method"):
        solve("key", q0, q1, k0, 4, 2, 0.1, method="qr")  # type: ignore[arg-type]
    bad = k0.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        solve("key", q0, q1, bad, 4, 2, 0.1)
    with pytest.raises(ValueError, match="0 < ridge"):
        objective(q0, q0, q1, k0, 4, 2, 0.0)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match=r"unknown device|unsupported device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        q0, q1, k0, _ = make_layer(16, 1, 1, 2, 3)
        with pytest.raises(ValueError, match="no CUDA GPU"):
            solve("key", q0, q1, k0, 1, 1, 0.1, device="cuda")


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fix", ["key", "query"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ridge", [1e-2, 1.0, 10.0])
def test_cuda_matches_cpu(fix, method, ridge):
    n_layers, n_kv, rep, d_h, d = 3, 2, 4, 64, 512
    n_heads = n_kv * rep
    layers = [make_layer(300 + i, n_kv, rep, d_h, d, dtype=torch.bfloat16) for i in range(n_layers)]
    idx = (0, 1, 2) if fix == "key" else (2, 3, 0)
    args = [torch.stack([layer[i] for layer in layers]) for i in idx]
    fn = partial(solve, fix)
    cpu = fn(*args, n_heads, n_kv, ridge, device="cpu", method=method)
    gpu = fn(*[a.cuda() for a in args], n_heads, n_kv, ridge, device="cuda", method=method)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert rel(gpu.cpu(), cpu) < 1e-4
    # And the change from POST (the part the solve computes) is right too.
    post = args[1].double()
    assert rel(gpu.cpu().double() - post, cpu - post) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fix", ["key", "query"])
def test_cuda_from_cpu_inputs_in_chunks(fix):
    """The writer's path: CPU-resident bf16 layers, solved on the GPU a few layers at a time."""
    n_layers, n_kv, rep, d_h, d = 5, 2, 2, 32, 256
    n_heads = n_kv * rep
    layers = [make_layer(400 + i, n_kv, rep, d_h, d, dtype=torch.bfloat16) for i in range(n_layers)]
    idx = (0, 1, 2) if fix == "key" else (2, 3, 0)
    cols = [[layer[i] for layer in layers] for i in idx]
    fn = partial(solve, fix)
    ref = fn(*cols, n_heads, n_kv, 0.05, device="cpu")
    per_layer = max(c[0].numel() for c in cols) * 4
    got = fn(
        *cols,
        n_heads,
        n_kv,
        0.05,
        device="cuda",
        out_dtype=torch.bfloat16,
        chunk_bytes=2 * per_layer,
    )
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert rel(got.cpu(), ref) < 4e-3  # bf16 rounding of a float32 result
    f32 = fn(*cols, n_heads, n_kv, 0.05, device="cuda", chunk_bytes=2 * per_layer)
    assert rel(f32.cpu(), ref) < 1e-4
