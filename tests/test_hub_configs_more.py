"""More adapters against configs as published on the Hub (issue 14 point 7): LFM2, MiniMax-M1,
DeepSeek-V3 and falcon-7b's legacy ``RefinedWebModel`` spelling.

Fixtures are in tests/fixtures/hub_configs (sources in SOURCES.md). As in test_hub_configs.py,
each test states the layer map from the model card and the published config, builds a tiny pair
whose ``config.json`` is the published one with only the sizes shrunk (layer-map fields, legacy
spellings, ``quantization_config`` and ``auto_map`` kept), merges it through the CLI and compares
bytes with its own statement of the routing set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import assert_merged, load_all, perturbed
from conftest import write_checkpoint as write_hand
from test_hub_configs import (
    FIXTURES,
    SMALL,
    build_pair,
    inspect_json,
    merge_json,
    published,
    save_pair,
)

# -- LFM2-1.2B (lfm2), as first published: the layer map in full_attn_idxs, no layer_types ---------

# LiquidAI/LFM2-1.2B: 16 layers, 10 gated short-convolution blocks and 6 GQA blocks at
# full_attn_idxs 2, 5, 8, 10, 12, 14 (model card: "16 (10 conv + 6 attn)"); no window.
LFM2_ATTN = [2, 5, 8, 10, 12, 14]


def test_lfm2_published_full_attn_idxs(tmp_path: Path, cli) -> None:
    """The attention layers' q_proj, k_proj, q_layernorm and k_layernorm come from PRE; the conv
    layers (conv.in_proj, conv.out_proj) and everything else stay POST's."""

    cfg = published("lfm2-1.2b.json")
    assert "layer_types" not in cfg and cfg["full_attn_idxs"] == LFM2_ATTN
    cfg |= SMALL | {"block_dim": 32, "conv_dim": 32, "conv_dim_out": 32, "block_ff_dim": 48}
    cfg |= {"block_multiple_of": 8, "num_heads": 2}
    pre, post = build_pair(tmp_path, cfg, "lfm2")

    info = inspect_json(cli, post)
    assert info["adapter"] == "lfm2"
    assert info["global_layers"] == LFM2_ATTN and info["local_layers"] == []
    assert len(info["layer_reasons"]) == 16
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == LFM2_ATTN
    post_t, _ = load_all(post)
    expected = {}
    for i in LFM2_ATTN:
        for leaf in ("q_proj", "k_proj", "q_layernorm", "k_layernorm"):
            name = f"model.layers.{i}.self_attn.{leaf}.weight"
            expected[name] = [(0, post_t[name].shape[0])]
    assert not any(".conv." in n and int(n.split(".")[2]) in LFM2_ATTN for n in post_t)
    assert_merged(out, pre, post, expected)


# -- MiniMax-M1 (remote code, model_type minimax_m1): attn_type_list, lightning layers ------------

# MiniMax-M1: 80 layers; attn_type_list 1 (softmax) at every eighth layer, 7, 15, ..., 79, and 0
# (lightning attention: qkv_proj, output_gate, norm, out_proj) elsewhere; sliding_window null.
MINIMAX_M1_SOFTMAX = list(range(7, 80, 8))


def _minimax_m1_shrunk() -> dict:
    cfg = published("minimax-m1.json") | SMALL
    return cfg | {"head_dim": 16, "rotary_dim": 8, "num_local_experts": 1, "num_experts_per_tok": 1}


def _minimax_m1_tensors(cfg: dict) -> dict[str, torch.Tensor]:
    """Every layer named as the published index names layer 7 (softmax) or layer 6 (lightning)."""
    index = json.loads((FIXTURES / "minimax-m1.index-layers-6-7.json").read_text())
    g = torch.Generator().manual_seed(1)
    hidden, heads, kv, hd = 32, 2, 1, 16
    shapes = {
        "q_proj": (heads * hd, hidden),
        "k_proj": (kv * hd, hidden),
        "v_proj": (kv * hd, hidden),
        "o_proj": (hidden, heads * hd),
        "qkv_proj": (3 * heads * hd, hidden),
        "output_gate": (heads * hd, hidden),
        "norm": (heads * hd,),
        "out_proj": (hidden, heads * hd),
        "gate": (1, hidden),
        "w1": (37, hidden),
        "w3": (37, hidden),
        "w2": (hidden, 37),
    }
    out = {"model.embed_tokens.weight": torch.randn(99, hidden, generator=g).to(torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        like = ".layers.7." if i in MINIMAX_M1_SOFTMAX else ".layers.6."
        for name in index["weight_map"]:
            if like in name:
                leaf = name.split(".")[-2]
                t = torch.randn(*shapes.get(leaf, (hidden,)), generator=g).to(torch.bfloat16)
                out[name.replace(like, f".layers.{i}.")] = t
    return out


def test_minimax_m1_published_attn_type_list(tmp_path: Path, cli) -> None:
    cfg = _minimax_m1_shrunk()
    assert cfg["model_type"] == "minimax_m1" and cfg["sliding_window"] is None
    tensors = _minimax_m1_tensors(cfg)
    pre = write_hand(tmp_path / "pre", cfg, tensors)
    post = write_hand(tmp_path / "post", cfg, perturbed(tensors, seed=3), shards=3)
    info = inspect_json(cli, post)
    assert info["global_layers"] == MINIMAX_M1_SOFTMAX and info["local_layers"] == []
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == MINIMAX_M1_SOFTMAX
    expected = {}
    for i in MINIMAX_M1_SOFTMAX:
        for leaf in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{leaf}.weight"
            expected[name] = [(0, tensors[name].shape[0])]
    assert_merged(out, pre, post, expected)
    # the tensors planned for layer 7 are named exactly as in MiniMax-M1's own index
    index = json.loads((FIXTURES / "minimax-m1.index-layers-6-7.json").read_text())
    planned = {p["name"] for p in summary["plan"]["tensors"] if p["layer"] == 7}
    assert planned == {
        "model.layers.7.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
    }
    assert planned <= set(index["weight_map"])


# -- DeepSeek-V3 (deepseek_v3): MLA with a query LoRA, an fp8 quantization_config --------------------

# deepseek-ai/DeepSeek-V3: 61 layers, every one MLA softmax attention (the first 3 dense MLPs, the
# others MoE); no window. With q_lora_rank 1536 the query path is q_a_proj -> q_a_layernorm ->
# q_b_proj (all query-only: routing); K is the rope rows [kv_lora_rank, kv_lora_rank + rope) of
# kv_a_proj_with_mqa and, per head, the first qk_nope_head_dim rows of kv_b_proj's [nope | v] block.
DEEPSEEK_LAYERS = list(range(61))


def test_deepseek_v3_published_config(tmp_path: Path, cli) -> None:

    cfg = published("deepseek-v3.json")
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    heads, q_rank, kv_rank, nope, rope, v = 2, 8, 8, 8, 4, 8
    cfg |= SMALL | {"num_attention_heads": heads, "num_key_value_heads": heads}
    cfg |= {"q_lora_rank": q_rank, "kv_lora_rank": kv_rank, "qk_nope_head_dim": nope}
    cfg |= {"qk_rope_head_dim": rope, "v_head_dim": v, "n_routed_experts": 4, "n_group": 1}
    cfg |= {"topk_group": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 12}
    pre, post = build_pair(tmp_path, cfg, "deepseek_v3")

    info = inspect_json(cli, post)
    assert info["global_layers"] == DEEPSEEK_LAYERS and info["local_layers"] == []
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == DEEPSEEK_LAYERS
    post_t, _ = load_all(post)
    expected: dict[str, list] = {}
    for i in DEEPSEEK_LAYERS:
        a = f"model.layers.{i}.self_attn."
        expected[a + "q_a_proj.weight"] = [(0, q_rank)]
        expected[a + "q_a_layernorm.weight"] = [(0, q_rank)]
        expected[a + "q_b_proj.weight"] = [(0, heads * (nope + rope))]
        expected[a + "kv_a_proj_with_mqa.weight"] = [(kv_rank, kv_rank + rope)]
        expected[a + "kv_b_proj.weight"] = [
            (h * (nope + v), h * (nope + v) + nope) for h in range(2)
        ]
    assert set(expected) <= set(post_t)
    assert_merged(out, pre, post, expected)


# -- falcon-7b as first published: model_type RefinedWebModel (multi-query, remote code) ----------


def test_falcon_7b_legacy_refinedwebmodel_config(tmp_path: Path, cli) -> None:
    """falcon-7b's first config: model_type 'RefinedWebModel', n_head 71, n_layer 32, multi_query
    true, no n_head_kv. Its query_key_value is [Q (all heads) | k | v] with one shared KV head (the
    layout FalconConfig calls multi_query without new_decoder_architecture): here 2 query heads of
    16 rows, then k (16 rows), then v (16 rows)."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = published("falcon-7b-refinedwebmodel.json")
    assert cfg["model_type"] == "RefinedWebModel" and "n_head_kv" not in cfg
    cfg |= {"hidden_size": 32, "n_head": 2, "vocab_size": 99}
    torch.manual_seed(0)
    model = FalconForCausalLM(  # the same model in FalconConfig's names
        FalconConfig(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=32,
            multi_query=True,
            new_decoder_architecture=False,
            bias=False,
            parallel_attn=True,
            alibi=False,
            vocab_size=99,
        )
    )
    pre, post = save_pair(model, tmp_path, cfg)

    info = inspect_json(cli, post)
    assert info["adapter"] == "falcon" and info["global_layers"] == list(range(32))
    out = tmp_path / "out"
    merge_json(cli, pre, post, out)
    rows = [(0, 48)]  # Q (2 x 16) and the shared k (16); v (rows 48-64) stays POST's
    expected = {f"transformer.h.{i}.self_attention.query_key_value.weight": rows for i in range(32)}
    post_t, _ = load_all(post)
    assert post_t["transformer.h.0.self_attention.query_key_value.weight"].shape[0] == 64
    assert_merged(out, pre, post, expected)


# -- OLMo-3.1-32B-Instruct (olmo3): layer_types with a 4096 window over a 65536 context ------------

# allenai/Olmo-3.1-32B-Instruct: 64 layers, three sliding-window layers then one full, so full at
# 3, 7, ..., 63; sliding_window 4096 < max_position_embeddings 65536: the others are local.
OLMO3_FULL = list(range(3, 64, 4))
OLMO3_SLIDING = [i for i in range(64) if i not in OLMO3_FULL]


def test_olmo3_published_layer_types(tmp_path: Path, cli) -> None:
    """q_norm/k_norm are whole-projection norms (heads x head_dim): restored with q/k."""

    cfg = published("olmo-3.1-32b-instruct.json") | SMALL | {"num_key_value_heads": 1}
    pre, post = build_pair(tmp_path, cfg, "olmo3")

    info = inspect_json(cli, post)
    assert info["global_layers"] == OLMO3_FULL and info["local_layers"] == OLMO3_SLIDING
    assert "4096 < context 65536" in info["layer_reasons"][0]
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == OLMO3_FULL
    post_t, _ = load_all(post)
    expected = {}
    for i in OLMO3_FULL:
        for leaf in ("q_proj", "k_proj", "q_norm", "k_norm"):
            name = f"model.layers.{i}.self_attn.{leaf}.weight"
            expected[name] = [(0, post_t[name].shape[0])]
    assert_merged(out, pre, post, expected)


# -- LFM2.5-VL-1.6B (lfm2_vl): VLM nesting, text_config.layer_types ---------------------------------

# LiquidAI/LFM2.5-VL-1.6B: the language model is LFM2-1.2B's 16 layers (text_config._name_or_path),
# its layer_types naming full_attention at 2, 5, 8, 10, 12, 14 and conv elsewhere.


def test_lfm25_vl_nested_text_config(tmp_path: Path, cli) -> None:
    from transformers import AutoModelForImageTextToText

    cfg = published("lfm2.5-vl-1.6b.json")
    assert cfg["text_config"]["layer_types"].count("full_attention") == 6
    cfg["text_config"] |= SMALL | {"block_dim": 32, "conv_dim": 32, "conv_dim_out": 32}
    cfg["text_config"] |= {"block_ff_dim": 48, "block_multiple_of": 8, "num_heads": 2}
    cfg["vision_config"] |= {"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2}
    cfg["vision_config"] |= {"num_hidden_layers": 1}
    cfg |= {"projector_hidden_size": 16}
    pre, post = build_pair(
        tmp_path, cfg, "lfm2_vl", auto=AutoModelForImageTextToText, token_ids=False
    )

    info = inspect_json(cli, post)
    assert info["global_layers"] == LFM2_ATTN and info["local_layers"] == []
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == LFM2_ATTN
    post_t, _ = load_all(post)
    prefix = next(n for n in post_t if ".layers.2.self_attn.q_proj" in n).split("2.self_attn")[0]
    expected = {}
    for i in LFM2_ATTN:
        for leaf in ("q_proj", "k_proj", "q_layernorm", "k_layernorm"):
            name = f"{prefix}{i}.self_attn.{leaf}.weight"
            expected[name] = [(0, post_t[name].shape[0])]
    assert_merged(out, pre, post, expected)
