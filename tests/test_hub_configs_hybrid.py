"""Hybrid-family adapters against configs as published (tests/fixtures/hub_configs, sources in
SOURCES.md): Qwen3-Next, Nemotron-H, Falcon-H1 and Jamba.

Each test states the layer map from the model card and the config's own layer-map field (not read
back through qkrestore), builds a tiny PRE/POST pair with transformers whose ``config.json`` is the
published one with only the sizes shrunk, and checks ``inspect-layers`` and ``merge`` byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from conftest import assert_merged, load_all, resolve_rows, routing_rows
from test_hub_configs import SMALL, _check_merge, build_published_pair, inspect_json, merge_json


def _planned(summary: dict, layer: int) -> set[str]:
    return {p["name"] for p in summary["plan"]["tensors"] if p["layer"] == layer}


# -- Qwen3-Next-80B-A3B (qwen3_next): no layer_types, full_attention_interval 4 -------------------

QWEN3_NEXT = "qwen3-next-80b-a3b.json"
# Model card: 48 layers laid out as 12 x (3 x (Gated DeltaNet -> MoE) -> 1 x (Gated Attention ->
# MoE)); the published config says it with full_attention_interval 4 and no layer_types.
QWEN3_NEXT_FULL = [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
QWEN3_NEXT_SIZES = SMALL | {"head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1}
QWEN3_NEXT_SIZES |= {"moe_intermediate_size": 12, "shared_expert_intermediate_size": 12}
QWEN3_NEXT_SIZES |= {"linear_num_key_heads": 1, "linear_num_value_heads": 2}
QWEN3_NEXT_SIZES |= {"linear_key_head_dim": 8, "linear_value_head_dim": 8}


def test_qwen3_next_published_interval_layer_map_and_gated_merge(tmp_path: Path, cli) -> None:
    """The gated q_proj (per head [query | gate], attn_output_gate by default) keeps each head's
    query rows from PRE and its gate rows from POST; k_proj and the q/k norms come from PRE."""
    pre, post, cfg = build_published_pair(tmp_path, QWEN3_NEXT, QWEN3_NEXT_SIZES)
    assert "layer_types" not in cfg and cfg["full_attention_interval"] == 4
    info = inspect_json(cli, post)
    assert info["adapter"] == "qwen3_next"
    assert info["global_layers"] == QWEN3_NEXT_FULL and info["local_layers"] == []
    assert len(info["layer_reasons"]) == 48
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == QWEN3_NEXT_FULL
    post_t, _ = load_all(post)
    want = routing_rows(post_t, QWEN3_NEXT_FULL, gated_heads=(2, 16))
    assert len(want) == 4 * len(QWEN3_NEXT_FULL)  # q (query rows only), k, q_norm, k_norm
    assert_merged(out, pre, post, resolve_rows(want, post_t))


# -- Nemotron-H-8B-Base-8K (nemotron_h, remote-code spelling hybrid_override_pattern) -----------

NEMOTRON_H = "nemotron-h-8b-base-8k.json"
# Model card: 52 layers, 24 Mamba-2, 24 MLP and 4 self-attention layers; in the published
# hybrid_override_pattern "M-M-M-M*-M-M-M-M-M*-..." the '*' (attention) sit at 7, 18, 29 and 40.
NEMOTRON_H_ATTN = [7, 18, 29, 40]
NEMOTRON_H_SIZES = SMALL | {"num_key_value_heads": 1, "attention_head_dim": 16}
NEMOTRON_H_SIZES |= {"mamba_num_heads": 2, "mamba_head_dim": 8, "ssm_state_size": 8}
NEMOTRON_H_SIZES |= {"n_groups": 1, "chunk_size": 8}


def test_nemotron_h_published_pattern_layer_map_and_merge(tmp_path: Path, cli) -> None:
    pre, post, cfg = build_published_pair(tmp_path, NEMOTRON_H, NEMOTRON_H_SIZES)
    pattern = cfg["hybrid_override_pattern"]
    assert len(pattern) == 52 and [i for i, c in enumerate(pattern) if c == "*"] == NEMOTRON_H_ATTN
    assert "layers_block_type" not in cfg and "layer_types" not in cfg  # the legacy spelling only
    info = inspect_json(cli, post)
    assert info["adapter"] == "nemotron_h"
    assert info["global_layers"] == NEMOTRON_H_ATTN and info["local_layers"] == []
    assert len(info["layer_reasons"]) == 52
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == NEMOTRON_H_ATTN
    # the attention mixer is backbone.layers.<i>.mixer (no self_attn), no bias, no q/k norm
    for i in NEMOTRON_H_ATTN:
        base = f"backbone.layers.{i}.mixer."
        assert _planned(summary, i) == {base + "q_proj.weight", base + "k_proj.weight"}
    expected = {
        f"backbone.layers.{i}.mixer.{t}_proj.weight": [(0, 10**9)]
        for i in NEMOTRON_H_ATTN
        for t in ("q", "k")
    }
    post_t, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(expected, post_t))


# -- Falcon-H1-0.5B (falcon_h1): parallel hybrid, attn_layer_indices null ---------------------------

FALCON_H1 = "falcon-h1-0.5b.json"
FALCON_H1_SIZES = SMALL | {"head_dim": 16, "mamba_n_heads": 2, "mamba_d_head": 8}
FALCON_H1_SIZES |= {"mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 8}
FALCON_H1_SIZES |= {"mamba_d_ssm": 16}


def test_falcon_h1_published_parallel_hybrid_is_all_attention(tmp_path: Path, cli) -> None:
    """Falcon-H1 runs attention beside Mamba-2 in every one of its 36 layers (model card: parallel
    hybrid); the published ``attn_layer_indices: null`` must not turn any layer into Mamba only."""
    pre, post, cfg = build_published_pair(tmp_path, FALCON_H1, FALCON_H1_SIZES)
    assert cfg["attn_layer_indices"] is None and cfg["num_hidden_layers"] == 36
    info = inspect_json(cli, post)
    assert info["adapter"] == "falcon_h1"
    assert info["global_layers"] == list(range(36)) and info["local_layers"] == []
    summary = _check_merge(cli, tmp_path, pre, post, list(range(36)))
    base = "model.layers.0.self_attn."
    assert _planned(summary, 0) == {base + "q_proj.weight", base + "k_proj.weight"}


# -- AI21-Jamba-1.5-Mini (jamba): attn_layer_period 8, attn_layer_offset 4 --------------------------

JAMBA = "ai21-jamba-1.5-mini.json"
# Jamba blocks of 8 layers with one attention layer each, at offset 4: 4, 12, 20, 28 of 32
JAMBA_ATTN = [4, 12, 20, 28]
JAMBA_SIZES = SMALL | {"num_experts": 2, "num_experts_per_tok": 1, "mamba_d_state": 4}
JAMBA_SIZES |= {"mamba_dt_rank": 4}


def test_jamba_published_period_offset_layer_map_and_merge(tmp_path: Path, cli) -> None:
    pre, post, cfg = build_published_pair(tmp_path, JAMBA, JAMBA_SIZES)
    assert (cfg["attn_layer_period"], cfg["attn_layer_offset"]) == (8, 4)
    assert cfg["sliding_window"] is None
    info = inspect_json(cli, post)
    assert info["adapter"] == "jamba"
    assert info["global_layers"] == JAMBA_ATTN and info["local_layers"] == []
    assert len(info["layer_reasons"]) == 32
    summary = _check_merge(cli, tmp_path, pre, post, JAMBA_ATTN)
    base = "model.layers.4.self_attn."
    assert _planned(summary, 4) == {base + "q_proj.weight", base + "k_proj.weight"}
