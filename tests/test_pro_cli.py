"""`qkrestore pro` end to end: the fixed side is PRE's bytes, the solved side matches an independent
per-head computation, ridge 0 equals merge, and outputs pass verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QWEN3_NEXT, build_hf_pair, load_all, raw
from test_handwritten_families import make_pair

HEADS = 2  # conftest.TINY


def reference_solve(
    free_pre, free_post, fixed_pre, n_heads: int, n_kv: int, ridge: float, fix: str
):
    """QK-Pro per head/group with numpy float64 loops, written from the formula, not the package."""
    fp, fq, xp = (np.asarray(t, dtype=np.float64) for t in (free_pre, free_post, fixed_pre))
    if fix == "key":
        d_h = fp.shape[0] // n_heads
        out = fq.copy()
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            k = xp[g * d_h : (g + 1) * d_h]
            G = k @ k.T
            lam = ridge * np.trace(G) / d_h
            sl = slice(h * d_h, (h + 1) * d_h)
            out[sl] = fq[sl] + G @ np.linalg.solve(G + lam * np.eye(d_h), fp[sl] - fq[sl])
        return out
    d_h = xp.shape[0] // n_heads
    out = fq.copy()
    per = n_heads // n_kv
    for g in range(n_kv):
        G = sum(
            xp[h * d_h : (h + 1) * d_h] @ xp[h * d_h : (h + 1) * d_h].T
            for h in range(g * per, (g + 1) * per)
        )
        lam = ridge * np.trace(G) / d_h
        sl = slice(g * d_h, (g + 1) * d_h)
        out[sl] = fq[sl] + G @ np.linalg.solve(G + lam * np.eye(d_h), fp[sl] - fq[sl])
    return out


def gated_q(t: torch.Tensor, hd: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next q_proj split into (query rows, gate rows) per head."""
    v = t.view(HEADS, 2, hd, -1)
    return v[:, 0].reshape(HEADS * hd, -1), v[:, 1].reshape(HEADS * hd, -1)


@pytest.fixture(scope="module")
def qwen3_next_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("q3n"), "qwen3_next", QWEN3_NEXT, noise=0.02)


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_hf_pair(
        tmp_path_factory.mktemp("q3"),
        "qwen3",
        {"num_hidden_layers": 2, "num_key_value_heads": 1, "num_attention_heads": 4, "head_dim": 8},
        noise=0.02,
    )


@pytest.mark.parametrize("fix", ["key", "query"])
@pytest.mark.parametrize("ridge", ["0.5", "3"])
def test_qwen3_next_gated(qwen3_next_pair, tmp_path: Path, cli, fix: str, ridge: str) -> None:
    pre, post = qwen3_next_pair
    out = tmp_path / "out"
    res = cli(
        "pro", pre, post, "-o", out, "--fix", fix, "--ridge", ridge, "--device", "cpu", "--json"
    )
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["method"] == "qk-pro" and doc["plan"]["params"]["fix"] == fix
    got, _ = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for i in (1, 3):
        p = f"model.layers.{i}.self_attn."
        q_got, gate_got = gated_q(got[p + "q_proj.weight"])
        q_pre, _ = gated_q(pre_t[p + "q_proj.weight"])
        q_post, gate_post = gated_q(post_t[p + "q_proj.weight"])
        assert raw(gate_got) == raw(gate_post)  # gate rows are never touched
        for n in ("q_norm.weight", "k_norm.weight"):
            assert raw(got[p + n]) == raw(pre_t[p + n])
        if fix == "key":
            assert raw(got[p + "k_proj.weight"]) == raw(pre_t[p + "k_proj.weight"])
            want = reference_solve(
                q_pre, q_post, pre_t[p + "k_proj.weight"], HEADS, 1, float(ridge), "key"
            )
            np.testing.assert_allclose(q_got.double().numpy(), want, rtol=1e-5, atol=1e-6)
            assert not torch.equal(q_got, q_pre) and not torch.equal(q_got, q_post)
        else:
            assert raw(q_got) == raw(q_pre)
            want = reference_solve(
                pre_t[p + "k_proj.weight"],
                post_t[p + "k_proj.weight"],
                q_pre,
                HEADS,
                1,
                float(ridge),
                "query",
            )
            np.testing.assert_allclose(
                got[p + "k_proj.weight"].double().numpy(), want, rtol=1e-5, atol=1e-6
            )
    # the linear-attention layers and everything else are POST's
    for n, t in got.items():
        if ".self_attn." not in n:
            assert raw(t) == raw(post_t[n]), n
    assert cli("verify", out).code == 0
    card = (out / "README.md").read_text()
    assert "QK-Pro" in card and f"fix: `{fix}`" in card and "qk-pro" in card


@pytest.mark.parametrize("fix", ["key", "query"])
def test_ridge_zero_equals_merge(qwen3_pair, tmp_path: Path, cli, fix: str) -> None:
    pre, post = qwen3_pair
    assert (
        cli("pro", pre, post, "-o", tmp_path / "pro", "--ridge", "0", "--fix", fix, "-q").code == 0
    )
    assert cli("merge", pre, post, "-o", tmp_path / "merge", "-q").code == 0
    a, _ = load_all(tmp_path / "pro")
    b, _ = load_all(tmp_path / "merge")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=0)


def test_gqa_groups_in_qwen3(qwen3_pair, tmp_path: Path, cli) -> None:
    pre, post = qwen3_pair
    out = tmp_path / "out"
    assert cli("pro", pre, post, "-o", out, "--ridge", "1", "-q").code == 0
    got, _ = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for i in (0, 1):
        p = f"model.layers.{i}.self_attn."
        want = reference_solve(
            pre_t[p + "q_proj.weight"],
            post_t[p + "q_proj.weight"],
            pre_t[p + "k_proj.weight"],
            4,
            1,
            1.0,
            "key",
        )
        np.testing.assert_allclose(
            got[p + "q_proj.weight"].double().numpy(), want, rtol=1e-5, atol=1e-6
        )
    assert cli("verify", out).code == 0


def test_verify_catches_a_changed_computed_tensor(qwen3_pair, tmp_path: Path, cli) -> None:
    import struct

    pre, post = qwen3_pair
    out = tmp_path / "out"
    assert cli("pro", pre, post, "-o", out, "-q").code == 0
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    off = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    data[off + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    res = cli("verify", out, "--forward", "never")
    assert res.code == 1 and name in res.err


def test_pro_on_hand_written_families_and_dry_run(tmp_path: Path, cli) -> None:
    from test_handwritten_families import hypenet_config

    pre, post = make_pair(tmp_path, hypenet_config(), [False, True, False, True, False])
    res = cli("pro", pre, post, "-o", tmp_path / "out", "--dry-run", "--json")
    assert res.code == 0 and not (tmp_path / "out").exists()
    sources = {t["name"]: t["source"] for t in json.loads(res.out)["plan"]["tensors"]}
    assert sources["model.layers.1.self_attn.q_proj.weight"] == "computed"
    assert sources["model.layers.1.self_attn.k_proj.weight"] == "pre"
    for fix in ("key", "query"):
        out = tmp_path / f"out-{fix}"
        assert cli("pro", pre, post, "-o", out, "--fix", fix, "-q").code == 0
        assert cli("verify", out).code == 0


def test_cuda_without_gpu_is_a_clear_error(qwen3_pair, tmp_path: Path, cli) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    pre, post = qwen3_pair
    res = cli("pro", pre, post, "-o", tmp_path / "out", "--device", "cuda")
    assert res.code == 2 and "CUDA" in res.err.upper() and len(res.err_lines) == 1
    assert not (tmp_path / "out").exists()


CORE_HF = {
    "qwen3_5_text": (
        "qwen3_5_text",
        {
            k: v
            for k, v in QWEN3_NEXT.items()
            if k
            not in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "layer_types",
            )
        }
        | {"full_attention_interval": 2},
    ),
    "llama": ("llama", {"num_hidden_layers": 2}),
    "mistral": ("mistral", {"num_hidden_layers": 2, "sliding_window": None}),
    "qwen2": ("qwen2", {"num_hidden_layers": 2}),
}


@pytest.mark.parametrize("family", list(CORE_HF))
def test_pro_both_sides_on_core_families(family: str, tmp_path: Path, cli) -> None:
    model_type, kwargs = CORE_HF[family]
    pre, post = build_hf_pair(tmp_path, model_type, kwargs, noise=0.02)
    for fix in ("key", "query"):
        out = tmp_path / f"out-{fix}"
        res = cli("pro", pre, post, "-o", out, "--fix", fix, "--ridge", "0.5", "-q")
        assert res.code == 0, res.err
        res = cli("verify", out, "--forward", "always", "--json")
        assert res.code == 0, res.err
        assert json.loads(res.out)["forward"]["ran"] is True


def test_pro_on_jet_nemotron_and_generic(tmp_path: Path, cli) -> None:
    jet = {
        "model_type": "jet_nemotron",
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "layer_types": ["jet", "attn", "swa"],
    }
    generic = {
        "model_type": "new_thing",
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "layer_types": ["linear_attention", "full_attention", "full_attention"],
    }
    for name, config in (("jet", jet), ("generic", generic)):
        pre, post = make_pair(tmp_path / name, config, [False, True, True], bias=True)
        for fix in ("key", "query"):
            out = tmp_path / name / f"out-{fix}"
            assert cli("pro", pre, post, "-o", out, "--fix", fix, "-q").code == 0
            assert cli("verify", out).code == 0


def test_pro_refuses_mla(tmp_path: Path, cli) -> None:
    from test_families_kimi_zamba import KIMI

    pre, post = build_hf_pair(tmp_path, "kimi_linear", KIMI)
    res = cli("pro", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and "MLA" in res.err and "merge" in res.err and len(res.err_lines) == 1
    assert not (tmp_path / "out").exists()
