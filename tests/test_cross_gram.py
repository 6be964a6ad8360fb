"""QK-Pro's cross-gram form (``pro --form cross-gram``): the constraint holds, the change is the
smallest that meets it, rank-deficient and GQA blocks are handled, and the CLI writes a checkpoint
that ``verify`` accepts.

The references are written here from the formula with NumPy's pseudo-inverse (forming the d × d
projector, which the package never does), not from the package's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QWEN3_NEXT, build_hf_pair, load_all, raw

from qkrestore.qkpro.closed_form import solve_cross_gram, solve_cross_gram_batched


def reference(free_pre, free_post, fixed, n_heads: int, n_kv: int, fix: str) -> np.ndarray:
    """Per head (fix=key) or group (fix=query): P_post + (P_pre − P_post) Fᵀ (F Fᵀ)⁺ F."""
    a, b, f = (np.asarray(t, dtype=np.float64) for t in (free_pre, free_post, fixed))
    per = n_heads // n_kv
    out = b.copy()
    if fix == "key":
        d_h = a.shape[0] // n_heads
        for h in range(n_heads):
            g = h // per
            k = f[g * d_h : (g + 1) * d_h]
            sl = slice(h * d_h, (h + 1) * d_h)
            out[sl] = b[sl] + (a[sl] - b[sl]) @ k.T @ np.linalg.pinv(k @ k.T) @ k
        return out
    d_h = a.shape[0] // n_kv
    for g in range(n_kv):
        q = f[g * per * d_h : (g + 1) * per * d_h]
        sl = slice(g * d_h, (g + 1) * d_h)
        out[sl] = b[sl] + (a[sl] - b[sl]) @ q.T @ np.linalg.pinv(q @ q.T) @ q
    return out


def null_perturbation(rng: np.random.Generator, fixed_rows: np.ndarray, shape) -> np.ndarray:
    """A random matrix N with N Fᵀ = 0: any feasible point is the solution plus such an N."""
    r = rng.standard_normal(shape)
    proj = np.linalg.pinv(fixed_rows) @ fixed_rows  # d × d, fine in a test
    return r - r @ proj


def weights(seed: int, n_heads: int, n_kv: int, d_h: int, d: int):
    g = torch.Generator().manual_seed(seed)
    q_pre = torch.randn(n_heads * d_h, d, generator=g, dtype=torch.float64)
    q_post = q_pre + 0.3 * torch.randn(n_heads * d_h, d, generator=g, dtype=torch.float64)
    k_pre = torch.randn(n_kv * d_h, d, generator=g, dtype=torch.float64)
    k_post = k_pre + 0.3 * torch.randn(n_kv * d_h, d, generator=g, dtype=torch.float64)
    return q_pre, q_post, k_pre, k_post


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_fix_key_constraint_and_minimality(rank_deficient: bool) -> None:
    n_heads, n_kv, d_h, d = 4, 2, 4, 24
    q_pre, q_post, k_pre, _ = weights(0, n_heads, n_kv, d_h, d)
    if rank_deficient:  # group 1's keys span only 2 of their 4 rows
        g = torch.Generator().manual_seed(5)
        low = torch.randn(d_h, 2, generator=g, dtype=torch.float64)
        k_pre[d_h:] = low @ torch.randn(2, d, generator=g, dtype=torch.float64)
    q_new = solve_cross_gram("key", q_pre, q_post, k_pre, n_heads, n_kv)
    assert q_new.dtype == torch.float64 and q_new.shape == q_pre.shape
    np.testing.assert_allclose(
        q_new.numpy(), reference(q_pre, q_post, k_pre, n_heads, n_kv, "key"), atol=1e-10
    )
    rng = np.random.default_rng(1)
    for h in range(n_heads):
        k = k_pre[(h // 2) * d_h : (h // 2 + 1) * d_h].numpy()
        sl = slice(h * d_h, (h + 1) * d_h)
        new, pre, post = q_new[sl].numpy(), q_pre[sl].numpy(), q_post[sl].numpy()
        # the constraint: the head's cross-Gram with its keys is PRE's
        np.testing.assert_allclose(new @ k.T, pre @ k.T, atol=1e-10)
        assert not np.allclose(new, pre) and not np.allclose(new, post)
        # minimality: every feasible point is new + N with N kᵀ = 0, and N is orthogonal to the
        # change, so its distance to POST is never smaller
        delta = new - post
        for _ in range(5):
            n = null_perturbation(rng, k, delta.shape)
            np.testing.assert_allclose((new + n) @ k.T, pre @ k.T, atol=1e-9)
            assert abs(np.sum(delta * n)) < 1e-9 * np.linalg.norm(delta) * np.linalg.norm(n)
            assert np.linalg.norm(new + n - post) > np.linalg.norm(delta)
    if rank_deficient:  # the change lies in the 2-dimensional row space of the deficient keys
        delta = (q_new - q_post)[2 * d_h :].numpy()
        assert np.linalg.matrix_rank(delta, tol=1e-9) == 2


def test_fix_query_gqa_constraint_and_minimality() -> None:
    n_heads, n_kv, d_h, d = 4, 2, 3, 20
    q_pre, _, k_pre, k_post = weights(2, n_heads, n_kv, d_h, d)
    k_new = solve_cross_gram("query", k_pre, k_post, q_pre, n_heads, n_kv)
    np.testing.assert_allclose(
        k_new.numpy(), reference(k_pre, k_post, q_pre, n_heads, n_kv, "query"), atol=1e-10
    )
    rng = np.random.default_rng(3)
    for g in range(n_kv):
        sl = slice(g * d_h, (g + 1) * d_h)
        q_g = q_pre[g * 2 * d_h : (g + 1) * 2 * d_h].numpy()  # both heads that read group g
        for h in range(2):
            q_h = q_g[h * d_h : (h + 1) * d_h]
            np.testing.assert_allclose(
                q_h @ k_new[sl].numpy().T, q_h @ k_pre[sl].numpy().T, atol=1e-10
            )
        delta = (k_new - k_post)[sl].numpy()
        n = null_perturbation(rng, q_g, delta.shape)
        assert abs(np.sum(delta * n)) < 1e-9 * np.linalg.norm(delta) * np.linalg.norm(n)
        assert np.linalg.norm(delta + n) > np.linalg.norm(delta)


def test_limits() -> None:
    """Fixed blocks of full column rank force PRE; an all-zero fixed block imposes nothing."""
    q_pre, q_post, k_pre, _ = weights(4, 2, 1, 4, 3)  # K_g is 4 × 3: its rows span all of ℝ³
    np.testing.assert_allclose(
        solve_cross_gram("key", q_pre, q_post, k_pre, 2, 1).numpy(), q_pre.numpy(), atol=1e-12
    )
    q_pre, q_post, k_pre, _ = weights(5, 2, 1, 4, 16)
    got = solve_cross_gram("key", q_pre, q_post, torch.zeros_like(k_pre), 2, 1)
    assert torch.equal(got, q_post)


def test_batched_bf16_and_errors() -> None:
    """Layers batch like the ridge form; bf16 inputs are upcast before the difference is taken."""
    layers = [weights(10 + i, 4, 2, 4, 24) for i in range(3)]
    qp = [w[0].to(torch.bfloat16) for w in layers]
    qq = [w[1].to(torch.bfloat16) for w in layers]
    kp = [w[2].to(torch.bfloat16) for w in layers]
    got = solve_cross_gram_batched("key", qp, qq, kp, 4, 2, out_dtype=torch.float32)
    assert got.shape == (3, 16, 24) and got.dtype == torch.float32
    for i in range(3):
        want = reference(qp[i].double(), qq[i].double(), kp[i].double(), 4, 2, "key")
        np.testing.assert_allclose(got[i].double().numpy(), want, atol=1e-5)
    with pytest.raises(ValueError, match="KV groups"):
        solve_cross_gram("key", qp[0], qq[0], kp[0], 3, 2)
    with pytest.raises(ValueError, match="fix"):
        solve_cross_gram("both", qp[0], qq[0], kp[0], 4, 2)  # type: ignore[arg-type]


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("cg-q3n"), "qwen3_next", QWEN3_NEXT, noise=0.02)


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory) -> tuple[Path, Path]:
    """4 query heads over 2 KV groups, d_h = 4 < d = 32: both fix sides are non-trivial."""
    return build_hf_pair(
        tmp_path_factory.mktemp("cg-q3"),
        "qwen3",
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4},
        noise=0.02,
    )


@pytest.mark.parametrize("fix", ["key", "query"])
def test_pro_cross_gram_cli(gqa_pair, tmp_path: Path, cli, fix: str) -> None:
    pre, post = gqa_pair
    out = tmp_path / "out"
    res = cli("pro", pre, post, "-o", out, "--form", "cross-gram", "--fix", fix, "--json")
    assert res.code == 0, res.err
    params = json.loads(res.out)["plan"]["params"]
    assert params["form"] == "cross-gram" and params["fix"] == fix and "ridge" not in params
    got, _ = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for i in (0, 1):
        p = f"model.layers.{i}.self_attn."
        q, k = p + "q_proj.weight", p + "k_proj.weight"
        free, fixed = (q, k) if fix == "key" else (k, q)
        assert raw(got[fixed]) == raw(pre_t[fixed])
        want = reference(pre_t[free], post_t[free], pre_t[fixed], 4, 2, fix)
        np.testing.assert_allclose(got[free].double().numpy(), want, rtol=1e-5, atol=1e-6)
        cross = got[q].double().view(4, 4, -1) @ got[k].double().view(2, 4, -1).repeat_interleave(
            2, 0
        ).transpose(1, 2)
        cross_pre = pre_t[q].double().view(4, 4, -1) @ pre_t[k].double().view(
            2, 4, -1
        ).repeat_interleave(2, 0).transpose(1, 2)
        np.testing.assert_allclose(cross.numpy(), cross_pre.numpy(), atol=1e-5)
    for n, t in got.items():
        if ".self_attn.q_proj" not in n and ".self_attn.k_proj" not in n and "_norm" not in n:
            assert raw(t) == raw(post_t[n]), n
    ver = cli("verify", out, "--json")
    assert ver.code == 0, ver.out + ver.err
    assert "form: `cross-gram`" in (out / "README.md").read_text()


def test_pro_cross_gram_gated(gated_pair, tmp_path: Path, cli) -> None:
    """Qwen3-Next's gated q_proj: only the query rows move; verify accepts the output."""
    pre, post = gated_pair
    out = tmp_path / "out"
    assert cli("pro", pre, post, "-o", out, "--form", "cross-gram").code == 0
    got, _ = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for i in (1, 3):
        p = f"model.layers.{i}.self_attn."
        g, pr, po = (t[p + "q_proj.weight"].view(2, 2, 16, -1) for t in (got, pre_t, post_t))
        assert raw(g[:, 1]) == raw(po[:, 1])  # gate rows stay POST's
        want = reference(
            pr[:, 0].reshape(32, -1),
            po[:, 0].reshape(32, -1),
            pre_t[p + "k_proj.weight"],
            2,
            1,
            "key",
        )
        np.testing.assert_allclose(g[:, 0].reshape(32, -1).double().numpy(), want, atol=1e-6)
    assert cli("verify", out).code == 0


def test_pro_bad_form(gqa_pair, tmp_path: Path, cli) -> None:
    pre, post = gqa_pair
    res = cli("pro", pre, post, "-o", tmp_path / "out", "--form", "lasso")
    assert res.code == 2 and len(res.err_lines) == 1 and "--form" in res.err
    assert not (tmp_path / "out").exists()
