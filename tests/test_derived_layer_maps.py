"""Families transformers knows but qkrestore has no adapter for: layer maps derived on the meta device.

Each family is built tiny with transformers' own config class, merged end to end through the CLI,
and checked twice, independently of qkrestore's planning code: byte for byte against the test's own
statement of the routing set, and by loading OUT, PRE and POST with transformers and comparing the
loaded modules (routing rows PRE's, everything else POST's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_merged, build_hf_pair, load_all, resolve_rows, routing_rows

MOE = {"num_local_experts": 2, "num_experts_per_tok": 1}
MLA = {
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 12,
}

SEPARATE = {
    "mixtral": ({"num_hidden_layers": 2} | MOE, "MixtralForCausalLM"),
    "minimax_m2": ({"num_hidden_layers": 2, "head_dim": 16} | MOE, "MiniMaxM2ForCausalLM"),
    "olmoe": (
        {"num_hidden_layers": 2, "num_experts": 2, "num_experts_per_tok": 1},
        "OlmoeForCausalLM",
    ),
    "granitemoe": ({"num_hidden_layers": 2} | MOE, "GraniteMoeForCausalLM"),
    "glm4_moe": (
        {
            "num_hidden_layers": 2,
            "use_qk_norm": True,
            "n_routed_experts": 2,
            "num_experts_per_tok": 1,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "moe_intermediate_size": 12,
            "partial_rotary_factor": 0.5,
        },
        "Glm4MoeForCausalLM",
    ),
}


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The parameters as transformers' loaded model holds them (after any on-load renames)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_loaded(out: Path, pre: Path, post: Path, rows_of) -> int:
    """Every loaded parameter of OUT: ``rows_of(name, tensor)`` rows from PRE, the rest POST's."""
    got, want_pre, want_post = _load(out), _load(pre), _load(post)
    assert set(got) == set(want_post)
    restored = 0
    for name, t in got.items():
        rows = rows_of(name, t)
        taken = torch.zeros(t.shape[0], dtype=torch.bool)
        for a, b in rows:
            taken[a:b] = True
        assert torch.equal(t[taken], want_pre[name][taken]), f"{name}: routing rows not PRE's"
        assert torch.equal(t[~taken], want_post[name][~taken]), f"{name}: other rows not POST's"
        if rows:
            assert not torch.equal(want_pre[name][taken], want_post[name][taken]), name
            restored += 1
    return restored


SEPARATE_ROUTING = re.compile(r"\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.(weight|bias)$")


@pytest.mark.parametrize("model_type", sorted(SEPARATE))
def test_derived_separate_projections(tmp_path: Path, cli, model_type: str) -> None:
    kwargs, class_name = SEPARATE[model_type]
    pre, post = build_hf_pair(tmp_path, model_type, kwargs)
    assert "layer_types" not in json.loads((post / "config.json").read_text())

    r = cli("inspect-layers", post, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["adapter"] == f"derived:{model_type}"
    assert f"derived from transformers' {class_name} on the meta device" in info["adapter_reason"]
    assert info["global_layers"] == [0, 1]
    assert all("softmax attention" in why for why in info["layer_reasons"])

    out = tmp_path / "out"
    r = cli("merge", pre, post, "-o", out)
    assert r.code == 0, r.err
    assert "derived from transformers'" in r.err

    post_t, _ = load_all(post)
    expected = resolve_rows(routing_rows(post_t, [0, 1]), post_t)
    assert any(n.endswith("k_proj.weight") for n in expected)
    assert_merged(out, pre, post, expected)

    def rows_of(name: str, t: torch.Tensor) -> list[tuple[int, int]]:
        return [(0, t.shape[0])] if SEPARATE_ROUTING.search(name) else []

    assert _check_loaded(out, pre, post, rows_of) == sum(
        1 for n in expected if n.startswith("model.layers.")
    )


def _mla_rows(heads: int, nope: int, rope: int, v: int, rank: int):
    """The test's own MLA routing set (DeepseekV3Attention): Q whole, K's rows of kv_a and kv_b."""

    def rows(name: str, t: torch.Tensor) -> list[tuple[int, int]]:
        if not re.search(r"\.self_attn\.", name):
            return []
        if re.search(r"\.(q_a_proj|q_b_proj|q_a_layernorm|q_proj)\.(weight|bias)$", name):
            return [(0, t.shape[0])]
        if name.endswith("kv_a_proj_with_mqa.weight"):
            return [(rank, rank + rope)]
        if name.endswith("kv_b_proj.weight"):
            return [(h * (nope + v), h * (nope + v) + nope) for h in range(heads)]
        return []

    return rows


def test_derived_mla_deepseek_v3(tmp_path: Path, cli) -> None:
    pre, post = build_hf_pair(tmp_path, "deepseek_v3", MLA)
    r = cli("inspect-layers", post, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["adapter"] == "derived:deepseek_v3"
    assert "DeepseekV3ForCausalLM on the meta device" in info["adapter_reason"]
    assert "MLA" in info["adapter_reason"]

    out = tmp_path / "out"
    r = cli("merge", pre, post, "-o", out)
    assert r.code == 0, r.err
    rows = _mla_rows(heads=2, nope=8, rope=4, v=8, rank=8)
    post_t, _ = load_all(post)
    expected = {n: rows(n, t) for n, t in post_t.items() if rows(n, t)}
    assert len(expected) == 2 * 5  # q_a, q_a_layernorm, q_b, kv_a, kv_b in both layers
    assert_merged(out, pre, post, expected)
    assert _check_loaded(out, pre, post, rows) == len(expected)

    # --mla-latent pre: the latent rows [0, r) of kv_a_proj_with_mqa and kv_a_layernorm too
    out_latent = tmp_path / "latent"
    r = cli("merge", pre, post, "-o", out_latent, "--mla-latent", "pre")
    assert r.code == 0, r.err
    latent = dict(expected)
    for i in (0, 1):
        a = f"model.layers.{i}.self_attn."
        latent[a + "kv_a_proj_with_mqa.weight"] = [(0, 8 + 4)]
        latent[a + "kv_a_layernorm.weight"] = [(0, 8)]
    assert_merged(out_latent, pre, post, latent)

    # QK-Pro's closed form needs one W_K per head: refused for MLA, as for Kimi Linear
    r = cli("pro", pre, post, "-o", tmp_path / "pro")
    assert r.code == 2
    assert "QK-Pro is not defined for MLA layers" in r.err
    assert not (tmp_path / "pro").exists()


def test_derived_sliding_window_local_and_window_rule(tmp_path: Path, cli) -> None:
    """Mixtral passes config.sliding_window to every layer: local when shorter than the context,
    global when it covers the context (512 here)."""
    kwargs = {"num_hidden_layers": 2, "sliding_window": 8} | MOE
    pre, post = build_hf_pair(tmp_path / "w8", "mixtral", kwargs)
    r = cli("inspect-layers", post, "--json")
    info = json.loads(r.out)
    assert info["local_layers"] == [0, 1] and info["global_layers"] == []
    assert all("sliding_window 8 < context 512" in why for why in info["layer_reasons"])
    r = cli("merge", pre, post, "-o", tmp_path / "w8" / "out")
    assert r.code == 2 and "only local" in r.err

    pre, post = build_hf_pair(tmp_path / "w512", "mixtral", kwargs | {"sliding_window": 512})
    info = json.loads(cli("inspect-layers", post, "--json").out)
    assert info["global_layers"] == [0, 1]
    assert all("sliding_window 512 ≥ context 512" in why for why in info["layer_reasons"])
    out = tmp_path / "w512" / "out"
    assert cli("merge", pre, post, "-o", out).code == 0
    post_t, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(routing_rows(post_t, [0, 1]), post_t))


def test_derived_refuses_fused_projections(tmp_path: Path, cli) -> None:
    """GPT-2's fused c_attn cannot be split by derivation: one line naming the module and why."""
    pre, post = build_hf_pair(tmp_path, "gpt2", {"n_layer": 2, "n_embd": 32, "n_head": 2})
    r = cli("merge", pre, post, "-o", tmp_path / "out")
    assert r.code == 2
    assert len(r.err_lines) == 1
    assert "'gpt2' is not a known family" in r.err
    assert "GPT2Attention) has no separate q_proj/k_proj (children: c_attn, c_proj)" in r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()


def test_unknown_to_transformers_too(tmp_path: Path, cli) -> None:
    from conftest import write_checkpoint

    cfg = {"model_type": "no_such_family_xyz", "num_hidden_layers": 2}
    post = write_checkpoint(tmp_path / "m", cfg, {"model.layers.0.attn.q.weight": torch.ones(2, 2)})
    r = cli("inspect-layers", post)
    assert r.code == 2
    assert "does not know model_type 'no_such_family_xyz'" in r.err


def test_layer_types_wins_over_derivation(tmp_path: Path, cli) -> None:
    """Resolution order: known adapter, then layer_types (generic), then derived."""
    _pre, post = build_hf_pair(
        tmp_path,
        "cohere2",
        {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
        | {"sliding_window": 8, "head_dim": 16},
    )
    info = json.loads(cli("inspect-layers", post, "--json").out)
    assert info["adapter"] == "generic"
    assert info["global_layers"] == [1] and info["local_layers"] == [0]
