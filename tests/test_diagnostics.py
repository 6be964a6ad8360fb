"""The diagnostic commands: drift, attn-distance, autocorr, niah.

Every number is checked against a second computation written here from the definitions (explicit
d×d routing matrices, attention weights from ``output_attentions``, brute-force pair counts, Markov
chains with a known second eigenvalue), never against the package's own helpers.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QWEN3_NEXT, build_hf_pair, load_all, quiet_transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qkrestore.diagnostics import attention as at
from qkrestore.diagnostics import autocorr as ac
from qkrestore.diagnostics.drift import principal_angles, routing_drift_sq
from qkrestore.evaluate import niah as nh
from qkrestore.testing import tiny

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (the 'plot' extra) not installed")

LLAMA = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # d_h = 8


def check_png(path: Path) -> None:
    """A real PNG, not tiny, under 200 KB, and not one flat colour."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 200_000, len(data)
    with Image.open(path) as im:
        assert im.width > 200 and im.height > 150
        px = np.asarray(im.convert("L"))
    assert px.std() > 5  # something is drawn


# == drift ========================================================================================


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("llama"), "llama", LLAMA, noise=0.01)


@pytest.fixture(scope="module")
def q3n_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("q3n"), "qwen3_next", QWEN3_NEXT, noise=0.01)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def explicit_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees) between row spaces, by QR + SVD in plain numpy."""
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    s = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)
    return np.degrees(np.arccos(s))


def expected_layer(
    pre: dict, post: dict, base: str, heads: int, kv: int, hd: int, q_rows=None, bias=False
) -> dict:
    """Every drift number of one layer, from the definitions, with explicit d×d routing matrices."""

    def w(d: dict, name: str) -> np.ndarray:
        return d[base + name].double().numpy()

    q0, q1 = w(pre, "q_proj.weight"), w(post, "q_proj.weight")
    if q_rows is not None:
        q0, q1 = q0[q_rows], q1[q_rows]
    k0, k1 = w(pre, "k_proj.weight"), w(post, "k_proj.weight")
    v0, v1 = w(pre, "v_proj.weight"), w(post, "v_proj.weight")
    o0, o1 = w(pre, "o_proj.weight"), w(post, "o_proj.weight")
    per = heads // kv
    # with biases the logit is [x; 1]ᵀ [W_q | b_q]ᵀ [W_k | b_k] [y; 1]
    qa0, qa1, ka0, ka1 = q0, q1, k0, k1
    if bias:
        qa0 = np.hstack([q0, w(pre, "q_proj.bias")[:, None]])
        qa1 = np.hstack([q1, w(post, "q_proj.bias")[:, None]])
        ka0 = np.hstack([k0, w(pre, "k_proj.bias")[:, None]])
        ka1 = np.hstack([k1, w(post, "k_proj.bias")[:, None]])
    routing, q_heads, o_heads = [], [], []
    for h in range(heads):
        g = h // per
        qh0, qh1 = q0[h * hd : (h + 1) * hd], q1[h * hd : (h + 1) * hd]
        qha0, qha1 = qa0[h * hd : (h + 1) * hd], qa1[h * hd : (h + 1) * hd]
        kga0, kga1 = ka0[g * hd : (g + 1) * hd], ka1[g * hd : (g + 1) * hd]
        m0, m1 = qha0.T @ kga0, qha1.T @ kga1  # the d×d (or (d+1)×(d+1)) routing matrices
        assert m0.shape == (qa0.shape[1], qa0.shape[1])
        routing.append(rel(m0, m1))
        q_heads.append(rel(qh0, qh1))
        o_heads.append(rel(o0[:, h * hd : (h + 1) * hd], o1[:, h * hd : (h + 1) * hd]))
    k_heads = [rel(k0[g * hd : (g + 1) * hd], k1[g * hd : (g + 1) * hd]) for g in range(kv)]
    v_heads = [rel(v0[g * hd : (g + 1) * hd], v1[g * hd : (g + 1) * hd]) for g in range(kv)]
    angles = [
        explicit_angles(k0[g * hd : (g + 1) * hd], k1[g * hd : (g + 1) * hd]).max()
        for g in range(kv)
    ]
    return {
        "q": rel(q0, q1),
        "k": rel(k0, k1),
        "v": rel(v0, v1),
        "o": rel(o0, o1),
        "q_heads": q_heads,
        "k_heads": k_heads,
        "v_heads": v_heads,
        "o_heads": o_heads,
        "routing": routing,
        "angles": angles,
        "layer_angle": explicit_angles(k0, k1).max(),
    }


def assert_layer(got: dict, want: dict) -> None:
    for t in "qkvo":
        assert got[t]["rel_drift"] == pytest.approx(want[t], rel=1e-9)
        assert got[t]["heads"] == pytest.approx(want[f"{t}_heads"], rel=1e-9)
    assert got["routing_drift"]["heads"] == pytest.approx(want["routing"], rel=1e-9)
    assert got["routing_drift"]["mean"] == pytest.approx(np.mean(want["routing"]), rel=1e-9)
    groups = [g["max_deg"] for g in got["k_subspace"]["groups"]]
    assert groups == pytest.approx(want["angles"], abs=1e-6)
    assert got["k_subspace"]["layer"]["max_deg"] == pytest.approx(want["layer_angle"], abs=1e-6)


def test_drift_matches_explicit_computation(cli, llama_pair):
    pre, post = llama_pair
    r = cli("drift", pre, post, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    assert [x["layer"] for x in doc["layers"]] == [0, 1]
    for x in doc["layers"]:
        assert x["kind"] == "global"
        assert x["heads"] == {"query": 4, "kv": 2, "head_dim": 8}
        base = f"model.layers.{x['layer']}.self_attn."
        assert_layer(x, expected_layer(pre_t, post_t, base, 4, 2, 8))
    means = {x["layer"]: x["routing_drift"]["mean"] for x in doc["layers"]}
    assert [r["layer"] for r in doc["ranking"]] == sorted(means, key=lambda i: -means[i])


def test_drift_gated_query_rows_only(cli, q3n_pair):
    """Qwen3-Next's q_proj interleaves query and gate rows per head; only query rows count."""
    pre, post = q3n_pair
    r = cli("drift", pre, post, "--json", "--all-layers")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert [x["layer"] for x in doc["layers"]] == [1, 3]  # linear layers have no q/k projections
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    hd, heads = 16, 2
    q_rows = np.concatenate([np.arange(h * 2 * hd, h * 2 * hd + hd) for h in range(heads)])
    for x in doc["layers"]:
        base = f"model.layers.{x['layer']}.self_attn."
        assert_layer(x, expected_layer(pre_t, post_t, base, heads, 1, hd, q_rows=q_rows))


def test_drift_with_qk_biases(cli, tmp_path):
    """Q/K biases join the routing form as an extra input column; their drift is reported."""
    pre, post = build_hf_pair(tmp_path, "llama", LLAMA | {"attention_bias": True}, noise=0.01)
    r = cli("drift", pre, post, "--json")
    assert r.code == 0, r.err
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for x in json.loads(r.out)["layers"]:
        base = f"model.layers.{x['layer']}.self_attn."
        want = expected_layer(pre_t, post_t, base, 4, 2, 8, bias=True)
        assert_layer(x, want)
        for t in "qkvo":
            b0, b1 = pre_t[base + f"{t}_proj.bias"], post_t[base + f"{t}_proj.bias"]
            if float(b0.norm()) == 0:  # transformers initialises biases to zero: ratio undefined
                assert x[t]["bias_rel_drift"] is None
            else:
                want_b = float((b1 - b0).double().norm() / b0.double().norm())
                assert x[t]["bias_rel_drift"] == pytest.approx(want_b, rel=1e-9)


def test_drift_identical_checkpoints_is_zero(cli, llama_pair):
    pre, _ = llama_pair
    r = cli("drift", pre, pre, "--json")
    assert r.code == 0, r.err
    for x in json.loads(r.out)["layers"]:
        for t in "qkvo":
            assert x[t]["rel_drift"] == 0.0
            assert all(h == 0.0 for h in x[t]["heads"])
        assert x["routing_drift"]["heads"] == [0.0] * 4
        assert x["k_subspace"]["layer"]["max_deg"] == pytest.approx(0.0, abs=1e-5)


def test_drift_fused_layout(cli, tmp_path):
    """GPT-NeoX fuses per-head [q|k|v] in one tensor: drift uses the adapter's Q and K rows."""
    pre, post = build_hf_pair(tmp_path, "gpt_neox", {"num_hidden_layers": 1}, shard=None)
    r = cli("drift", pre, post, "--json")
    assert r.code == 0, r.err
    x = json.loads(r.out)["layers"][0]
    name = "gpt_neox.layers.0.attention.query_key_value."

    def wb(root: Path) -> np.ndarray:  # [W | b]: the fused bias joins the routing form
        t = load_all(root)[0]
        return np.hstack([t[name + "weight"], t[name + "bias"][:, None]]).astype(np.float64)

    w0, w1 = wb(pre), wb(post)
    hd = 16
    routing = []
    for h in range(2):
        s = h * 3 * hd
        q0, k0 = w0[s : s + hd], w0[s + hd : s + 2 * hd]
        q1, k1 = w1[s : s + hd], w1[s + hd : s + 2 * hd]
        routing.append(rel(q0.T @ k0, q1.T @ k1))
    assert x["routing_drift"]["heads"] == pytest.approx(routing, rel=1e-9)
    assert x["heads"] == {"query": 2, "kv": 2, "head_dim": hd}


@settings(max_examples=30, deadline=None)
@given(
    per=st.integers(1, 3),
    hd=st.integers(1, 6),
    d=st.integers(2, 12),
    scale=st.sampled_from([1e-9, 1e-4, 0.1, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_routing_identity_equals_dxd(per, hd, d, scale, seed):
    """The Gram-matrix form equals the explicit d×d difference, down to tiny drifts."""
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randn(per, hd, d, generator=g, dtype=torch.float64)
    k0 = torch.randn(hd, d, generator=g, dtype=torch.float64)
    dq = torch.randn(per, hd, d, generator=g, dtype=torch.float64) * scale
    dk = torch.randn(hd, d, generator=g, dtype=torch.float64) * scale
    num, den = routing_drift_sq(q0, q0 + dq, k0, k0 + dk)
    for h in range(per):
        # written as ΔQᵀK₁ + Q₀ᵀΔK so the reference itself keeps its digits at scale 1e-9
        diff = dq[h].T @ (k0 + dk) + q0[h].T @ dk
        assert float(num[h]) == pytest.approx(float((diff**2).sum()), rel=1e-6, abs=1e-300)
        assert float(den[h]) == pytest.approx(float(((q0[h].T @ k0) ** 2).sum()), rel=1e-10)


def test_principal_angles_known():
    e = torch.eye(4, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    rotated = torch.stack([torch.cos(t) * e[0] + torch.sin(t) * e[2], e[1]])
    theta = principal_angles(e[:2], rotated)
    assert theta.tolist() == pytest.approx([0.0, 0.3], abs=1e-12)
    tiny = torch.stack([e[0] + 1e-9 * e[3], e[1]])
    assert float(principal_angles(e[:2], tiny).max()) == pytest.approx(1e-9, rel=1e-6)


@needs_mpl
def test_drift_plot(cli, llama_pair, tmp_path):
    pre, post = llama_pair
    png = tmp_path / "drift.png"
    r = cli("drift", pre, post, "--plot", png)
    assert r.code == 0, r.err
    check_png(png)


def test_plot_without_matplotlib_is_one_line_error(cli, llama_pair, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    pre, post = llama_pair
    r = cli("drift", pre, post, "--plot", tmp_path / "x.png")
    assert r.code == 2
    assert len(r.err_lines) == 1 and "pip install matplotlib" in r.err and "'plot' extra" in r.err
    assert not (tmp_path / "x.png").exists()


# == attn-distance ================================================================================


def test_distance_hand_made_patterns():
    n = 9
    i = torch.arange(n)
    f64 = torch.float64
    first = torch.zeros(1, n, n, dtype=f64)
    first[0, :, 0] = 1  # everyone looks at token 0: D = mean(i)
    diag = torch.eye(n, dtype=f64)[None]  # everyone looks at itself: D = 0
    uniform = torch.tril(torch.ones(n, n, dtype=f64)) / (i + 1)[:, None]  # Σ_j (i−j)/(i+1) = i/2
    back3 = torch.zeros(n, n, dtype=f64)
    back3[i, (i - 3).clamp(min=0)] = 1  # three back where possible
    maps = torch.cat([first, diag, uniform[None], back3[None]])
    want = [(n - 1) / 2, 0.0, (n - 1) / 4, float(np.mean(np.minimum(np.arange(n), 3)))]
    assert at.mean_attention_distance(maps).tolist() == pytest.approx(want, abs=1e-12)
    assert at.mean_attention_distance(maps.bfloat16()).tolist() == pytest.approx(want, rel=1e-2)
    sink = 0.5 * first  # half the mass to a sink outside the sequence: half the distance
    assert at.mean_attention_distance(sink).tolist() == pytest.approx([(n - 1) / 4])


def test_needle_prompt_layout():
    p = at.needle_prompt(50, 200, 0.25, seed=3, exclude=(0, 1, 2), bos=1)
    ids = p.ids.tolist()
    assert len(ids) == 200 and ids[0] == 1
    assert not ({0, 1, 2} & set(ids[1:]))
    s, e = p.needle
    assert e - s == at.NEEDLE_LEN
    assert s == 1 + round(0.25 * (200 - 1 - at.NEEDLE_LEN - at.CUE_LEN))
    assert ids[p.cue[0] : p.cue[1]] == ids[s : s + at.CUE_LEN] and p.cue[1] == 200
    assert at.needle_prompt(50, 200, 0.25, seed=3).ids.tolist() != ids
    assert at.needle_prompt(50, 200, 0.25, seed=3, exclude=(0, 1, 2), bos=1).ids.tolist() == ids


def direct_distances(model_dir: Path, ids: torch.Tensor) -> list[list[float]]:
    """D_h straight from ``output_attentions``, in float64 with explicit (i − j) matrices."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    m = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    with torch.no_grad():
        out = m(input_ids=ids[None], output_attentions=True, use_cache=False)
    res = []
    for a in out.attentions:
        a = a[0].double()
        n = a.shape[-1]
        pos = torch.arange(n, dtype=torch.float64)
        res.append((a * (pos[:, None] - pos[None, :])).sum(-1).mean(-1).tolist())
    return res


@pytest.mark.parametrize("fixture", ["llama_pair", "q3n_pair"])
def test_distance_equals_output_attentions(fixture, request, monkeypatch):
    pre, _ = request.getfixturevalue(fixture)
    prompt = at.needle_prompt(99, 96, 0.3, exclude=(0, 1, 2), bos=1)
    want = direct_distances(pre, prompt.ids)  # one map per softmax layer, in order
    run = at.run_model(pre, prompt, torch.device("cpu"), torch.float32)
    assert run.mode == "hooks"
    got = [run.layers[i] for i in sorted(run.layers)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    layers = [1, 3] if fixture == "q3n_pair" else [0, 1]
    assert sorted(run.layers) == layers
    # models that do not declare their attention modules: the output_attentions fallback agrees
    monkeypatch.setattr(at, "_attention_modules", lambda model, layers: None)
    run2 = at.run_model(pre, prompt, torch.device("cpu"), torch.float32)
    assert run2.mode == "output_attentions"
    assert sorted(run2.layers) == sorted(run.layers)
    np.testing.assert_allclose([run2.layers[i] for i in sorted(run.layers)], got, rtol=1e-6)


@pytest.fixture(scope="module")
def trio(q3n_pair, tmp_path_factory) -> list[Path]:
    from qkrestore.cli import main

    pre, post = q3n_pair
    out = tmp_path_factory.mktemp("restored") / "restored"
    assert main(["merge", str(pre), str(post), "-o", str(out), "-q"]) == 0
    return [pre, post, out]


def test_attn_distance_cli_counts(cli, trio):
    r = cli("attn-distance", *trio, "--length", "128", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["prompt"]["tokens"] == 128 and doc["device"] == "cpu"
    assert len(doc["models"]) == 3 and [c["from"] for c in doc["comparisons"]] == [0, 1]
    dist = [{x["layer"]: x["heads"] for x in m["layers"]} for m in doc["models"]]
    assert sorted(dist[0]) == [1, 3]
    for cmp in doc["comparisons"]:
        a, b = dist[cmp["from"]], dist[cmp["to"]]
        for row in cmp["layers"]:
            i = row["layer"]
            assert row["fell"] == sum(y < x for x, y in zip(a[i], b[i]))
            assert row["rose"] == sum(y > x for x, y in zip(a[i], b[i]))
            assert row["heads"] == 2
        fell = {row["layer"]: row["fell"] for row in cmp["layers"]}
        assert fell[cmp["ranking"][0]] == max(fell.values())


def test_attn_distance_bad_layer(cli, trio):
    r = cli("attn-distance", trio[0], "--length", "64", "--layer", "0", "--head", "0")
    assert r.code == 2 and "not a softmax-attention layer" in r.err


@needs_mpl
def test_attn_distance_plot(cli, trio, tmp_path):
    png = tmp_path / "fig4.png"
    r = cli("attn-distance", *trio, "--length", "256", "--plot", png, "--layer", "3", "--head", "1")
    assert r.code == 0, r.err
    check_png(png)
    png2 = tmp_path / "picked.png"
    r = cli("attn-distance", *trio, "--length", "128", "--plot", png2, "--json")
    assert r.code == 0, r.err
    picked = json.loads(r.out)["plot"]
    assert picked["layer"] in (1, 3) and picked["head"] in (0, 1)
    check_png(png2)


# == autocorr =====================================================================================


def two_state_chain(lam: float, n: int, seed: int) -> np.ndarray:
    """Symmetric two-state chain with second eigenvalue λ₂ = lam (flip with probability (1−λ)/2)."""
    rng = np.random.default_rng(seed)
    flips = rng.random(n) < (1 - lam) / 2
    return np.cumsum(flips) % 2


def hidden_chain(stay: float, k: int, emit: int, n: int, seed: int) -> tuple[np.ndarray, float]:
    """K latent states (stay, else jump to a uniform other); state s emits one of its own ``emit``
    token types with Zipf-like frequencies. λ₂ = stay − (1 − stay)/(K − 1)."""
    rng = np.random.default_rng(seed)
    jumps = np.where(rng.random(n) < stay, 0, rng.integers(1, k, n))
    states = np.cumsum(jumps) % k
    p = 1 / np.arange(1, emit + 1)
    tokens = states * emit + rng.choice(emit, size=n, p=p / p.sum())
    return tokens, stay - (1 - stay) / (k - 1)


def brute_rho(docs: list[np.ndarray], d: int) -> float:
    """ρ(d) from the definition, with Python loops over every same-document pair."""
    allx = np.concatenate(docs)
    types, counts = np.unique(allx, return_counts=True)
    pi = dict(zip(types.tolist(), (counts / allx.size).tolist()))
    same, total = {}, {}
    for doc in docs:
        for t in range(len(doc) - d):
            v = int(doc[t])
            total[v] = total.get(v, 0) + 1
            same[v] = same.get(v, 0) + int(doc[t + d] == v)
    return sum(
        pi[v] * (same.get(v, 0) / total[v] - pi[v]) / (1 - pi[v]) for v in total if pi[v] < 1
    )


def test_rho_equals_definition_with_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5, n) for n in (40, 3, 17, 60)]
    docs[2][:] = 4  # a document of one repeated token
    dist, rho = ac.autocorrelation(docs, 12)
    assert dist.tolist() == list(range(1, 13))
    for d in range(1, 13):
        assert rho[d - 1] == pytest.approx(brute_rho(docs, d), abs=1e-12)


def test_two_state_chain_rho_is_lambda_power():
    lam = 0.85
    x = two_state_chain(lam, 300_000, seed=1)
    dist, rho = ac.autocorrelation([x], 60)
    assert rho[:5] == pytest.approx(lam ** np.arange(1, 6), abs=0.01)
    fit = ac.fit_exponential(dist, rho)
    assert fit.tau == pytest.approx(-1 / math.log(lam), rel=0.15)
    assert fit.amplitude == pytest.approx(1.0, rel=0.15)


def test_hidden_markov_chain_tau():
    x, lam = hidden_chain(stay=0.92, k=4, emit=40, n=400_000, seed=2)
    assert np.unique(x).size > 100
    dist, rho = ac.autocorrelation([x], 80)
    fit = ac.fit_exponential(dist, rho)
    assert fit.tau == pytest.approx(-1 / math.log(lam), rel=0.15)


def test_autocorr_cli_inputs(cli, tmp_path, niah_model):
    x = two_state_chain(0.8, 60_000, seed=3)
    np.save(tmp_path / "ids.npy", x)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, x)) + "\n")
    r1 = cli("autocorr", tmp_path / "ids.npy", "--max-distance", "30", "--json")
    r2 = cli("autocorr", tmp_path / "ids.txt", "--max-distance", "30", "--json")
    assert r1.code == 0 and r2.code == 0, r1.err + r2.err
    d1, d2 = json.loads(r1.out), json.loads(r2.out)
    assert d1["rho"] == d2["rho"] and d1["distances"] == list(range(1, 31))
    assert d1["tau"] == pytest.approx(-1 / math.log(0.8), rel=0.15)
    assert d1["tokens"] == 60_000 and d1["documents"] == 1
    # a 2-D .npy is one document per row
    np.save(tmp_path / "rows.npy", x.reshape(3, -1))
    d3 = json.loads(cli("autocorr", tmp_path / "rows.npy", "--max-distance", "30", "--json").out)
    assert d3["documents"] == 3
    # text: needs a tokenizer; .jsonl with 'text' fields, tokenised with the local one
    text = tmp_path / "essay.txt"
    text.write_text(" ".join(nh.essay_sentences(random.Random(0), 400)))
    r = cli("autocorr", text)
    assert r.code == 2 and "--tokenizer" in r.err and len(r.err_lines) == 1
    rows = [{"text": s} for s in nh.essay_sentences(random.Random(1), 300)]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r = cli("autocorr", jl, "--tokenizer", niah_model, "--max-distance", "8", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["documents"] == 300 and doc["rho"][0] is not None
    assert len(doc["rho"]) == 8
    # sentences are short and rarely repeat a word next to itself: nothing to fit, said so
    if doc["tau"] is None:
        assert doc["notes"] and "note:" in r.err


@needs_mpl
def test_autocorr_plot(cli, tmp_path):
    np.save(tmp_path / "ids.npy", two_state_chain(0.9, 50_000, seed=4))
    png = tmp_path / "rho.png"
    r = cli("autocorr", tmp_path / "ids.npy", "--max-distance", "50", "--plot", png)
    assert r.code == 0, r.err
    assert "τ" in r.out
    check_png(png)


# == niah =========================================================================================


def word_tokenizer():
    """A word-level tokenizer trained here on the prompt vocabulary (digits stay unknown)."""
    return tiny.word_tokenizer()


@pytest.fixture(scope="module")
def niah_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the word-level tokenizer saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    out = tmp_path_factory.mktemp("niah") / "tiny"
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("task", nh.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_niah_prompt_length_and_depth(task, depth):
    tok = word_tokenizer()

    def encode(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    length = 2000
    s = nh.build_sample(task, length, depth, encode, seed=7)
    ids = encode(s.prompt)
    assert len(ids) == s.tokens and abs(s.tokens - length) <= 0.02 * length
    # the needle sentence is where the sample says, at the asked depth of the haystack
    a, b = s.needle_tokens
    assert tok.decode(ids[a:b]).startswith("One of the special magic")
    (c0, c1), n_needle = s.context_tokens, b - a
    assert (a - c0) / ((c1 - c0) - n_needle) == pytest.approx(depth, abs=0.02)
    needle_sentence = nh.NEEDLE.format(kind=s.needle.kind, key=s.needle.key, value=s.needle.value)
    assert s.prompt.count(needle_sentence) == 1
    assert s.needle.key in s.prompt.split("\n")[-1]  # the question asks for the same key
    if task == "single-3":
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.needle.value
        )
    else:
        assert re.fullmatch(r"[1-9][0-9]{6}", s.needle.value)
    haystack = s.prompt.split("\n")[1].replace(needle_sentence, "")
    if task == "single-1":
        assert set(re.findall(r"[A-Z][^.]*\.", haystack)) <= set(
            x.strip() + "." for x in nh.NOISE.split(".") if x.strip()
        )
    else:
        assert "grass is green" not in haystack
    # deterministic
    assert nh.build_sample(task, length, depth, encode, seed=7) == s


def test_niah_scorer():
    assert nh.score(" 1234567.", "1234567")
    assert nh.score("The number is: 1234567", "1234567")
    assert not nh.score("12345678", "1234567")
    assert not nh.score("91234567", "1234567")
    assert not nh.score("1234 567", "1234567")
    u = "3f2b8c1e-9a4d-4e7f-8b6a-1c2d3e4f5a6b"
    assert nh.score(f"it is {u.upper()}.", u)
    assert not nh.score(u[:-1], u) and not nh.score(u + "0", u)
    assert nh.sample_depths(3, None) == [0.0, 0.5, 1.0]
    assert nh.sample_depths(2, 0.3) == [0.3, 0.3]


def test_niah_end_to_end(cli, niah_model):
    r = cli(
        "niah",
        niah_model,
        "--lengths",
        "256,512",
        "--samples",
        "2",
        "--task",
        "single-2",
        "--device",
        "cpu",
        "--json",
    )
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert [x["length"] for x in doc["results"]] == [256, 512]
    assert all(0 <= x["accuracy"] <= 1 and x["samples"] == 2 for x in doc["results"])
    assert len(doc["samples"]) == 4
    for s in doc["samples"]:
        assert abs(s["prompt_tokens"] - s["length"]) <= 0.02 * s["length"] + 1  # + BOS
        assert s["correct"] == nh.score(s["answer"], s["expected"])
    assert "lm-evaluation-harness" in doc["reference"]


def test_niah_needs_tokenizer(cli, llama_pair):
    pre, _ = llama_pair
    r = cli("niah", pre, "--lengths", "256", "--samples", "1")
    assert r.code == 2 and "no tokenizer files" in r.err and len(r.err_lines) == 1


def test_forward_failure_is_one_line(cli, llama_pair, monkeypatch):
    """A model whose forward pass breaks (a kernel refusing shapes, say) gives exit 2, one line."""
    import transformers

    def boom(self, *a, **k):
        raise RuntimeError("strides should be multiple of 16 bytes")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", boom)
    pre, _ = llama_pair
    r = cli("attn-distance", pre, "--length", "64")
    assert r.code == 2 and len(r.err_lines) == 2  # the "running …" line, then the error
    assert "forward pass failed" in r.err_lines[-1] and "strides" in r.err_lines[-1]
