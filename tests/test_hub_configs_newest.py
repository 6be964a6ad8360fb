"""The newest releases of the README's families against their configs as published (issue 14
point 7): Qwen's own Qwen3.5 uploads (dense ``qwen3_5``, VLM-nested ``text_config.layer_types``),
Gemma-3-1B (``gemma3_text``, the ``sliding_window_pattern`` spelling) and Granite-4.0-H-350M
(``granitemoehybrid``, ``layer_types`` mamba / attention).

Fixtures are in tests/fixtures/hub_configs (sources in SOURCES.md). As in
test_hub_configs.py, each test states the layer map from the model card and the published config,
builds a tiny pair whose ``config.json`` is the published one with only the sizes shrunk (layer-map
fields, spellings, windows and ``quantization_config`` kept), merges it through the CLI and
compares bytes with its own statement of the routing set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_merged, load_all, resolve_rows, routing_rows
from test_hub_configs import SMALL, build_pair, inspect_json, merge_json, published, save_pair

# -- Qwen3.5-27B / Qwen3.5-9B (qwen3_5, dense), as Qwen published them: VLM nesting ----------------

# Qwen/Qwen3.5-27B: 64 layers, 16 x (3 x Gated DeltaNet -> 1 x Gated Attention), so full attention
# at 3, 7, ..., 63; Qwen/Qwen3.5-9B: 32 layers in the same layout (full at 3, 7, ..., 31). Both say
# it twice, in text_config.layer_types and full_attention_interval 4; no window.
QWEN35 = {
    "qwen3.5-27b.json": (64, list(range(3, 64, 4))),
    "qwen3.5-9b.json": (32, list(range(3, 32, 4))),
}


def _qwen35_pair(root: Path, name: str) -> tuple[Path, Path, dict]:
    from transformers import AutoModelForImageTextToText

    cfg = published(name)
    cfg["text_config"] = cfg["text_config"] | SMALL | {"head_dim": 16, "linear_key_head_dim": 8}
    cfg["text_config"] |= {"linear_value_head_dim": 8, "linear_num_key_heads": 1}
    cfg["text_config"] |= {"linear_num_value_heads": 2}
    cfg["vision_config"] = cfg["vision_config"] | {"depth": 1, "hidden_size": 16, "num_heads": 2}
    cfg["vision_config"] |= {"intermediate_size": 16, "out_hidden_size": 32}
    pre, post = build_pair(root, cfg, "qwen3_5", auto=AutoModelForImageTextToText, token_ids=False)
    return pre, post, cfg


@pytest.mark.parametrize("name", sorted(QWEN35))
def test_qwen35_published_vlm_nested_layer_map_and_gated_merge(
    tmp_path: Path, cli, name: str
) -> None:
    """The gated q_proj (attn_output_gate true: per head [query | gate]) keeps each head's query
    rows from PRE and its gate rows from POST; k_proj and the q/k norms come from PRE."""
    layers, full = QWEN35[name]
    pre, post, cfg = _qwen35_pair(tmp_path, name)
    text = cfg["text_config"]
    assert cfg["model_type"] == "qwen3_5" and text["model_type"] == "qwen3_5_text"
    assert text["num_hidden_layers"] == layers and text["full_attention_interval"] == 4
    assert [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"] == full
    assert text["attn_output_gate"] is True and "sliding_window" not in text

    info = inspect_json(cli, post)
    assert info["global_layers"] == full and info["local_layers"] == []
    assert len(info["layer_reasons"]) == layers
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == full
    post_t, _ = load_all(post)
    prefix = next(n for n in post_t if ".layers.3.self_attn.q_proj" in n).split("3.self_attn")[0]
    want = routing_rows(post_t, full, prefix=prefix, gated_heads=(2, 16))
    assert len(want) == 4 * len(full)  # q (query rows only), k, q_norm, k_norm
    assert not any(f"{prefix}{i}.self_attn." in n for i in range(0, layers, 4) for n in post_t)
    assert_merged(out, pre, post, resolve_rows(want, post_t))


# -- Gemma-3-1B-it (gemma3_text): the layer map in sliding_window_pattern, no layer_types ---------

# google/gemma-3-1b-it: 26 layers, five local (sliding window 512) layers then one global, so global
# at 5, 11, 17, 23 (sliding_window_pattern 6); the window 512 is shorter than the 32768 context.
GEMMA3_1B_GLOBAL = [5, 11, 17, 23]
GEMMA3_1B_LOCAL = [i for i in range(26) if i not in GEMMA3_1B_GLOBAL]


def test_gemma3_1b_published_sliding_window_pattern(tmp_path: Path, cli) -> None:
    """q_norm/k_norm are per-head norms: restored with q/k in the global layers only."""

    cfg = published("gemma-3-1b-it.json")
    assert cfg["model_type"] == "gemma3_text" and "layer_types" not in cfg
    assert (cfg["sliding_window_pattern"], cfg["sliding_window"]) == (6, 512)
    cfg |= SMALL | {"head_dim": 16, "query_pre_attn_scalar": 16}
    pre, post = build_pair(tmp_path, cfg, "gemma3_text")

    info = inspect_json(cli, post)
    assert info["adapter"] == "gemma3"
    assert info["global_layers"] == GEMMA3_1B_GLOBAL and info["local_layers"] == GEMMA3_1B_LOCAL
    assert "512 < context 32768" in info["layer_reasons"][0]
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == GEMMA3_1B_GLOBAL
    post_t, _ = load_all(post)
    want = routing_rows(post_t, GEMMA3_1B_GLOBAL)
    assert len(want) == 4 * len(GEMMA3_1B_GLOBAL)  # q, k, q_norm, k_norm
    assert_merged(out, pre, post, resolve_rows(want, post_t))


# -- Granite-4.0-H-350M (granitemoehybrid, dense): layer_types mamba / attention ---------------------

# ibm-granite/granite-4.0-h-350m: 32 layers, 28 Mamba-2 and 4 attention layers (model card: "4
# attention layers + 28 Mamba2"), at 10, 13, 17 and 27 in layer_types; NoPE, no window; no experts
# (num_local_experts 0: a shared dense MLP).
GRANITE_H_ATTN = [10, 13, 17, 27]


def test_granite_4_h_350m_published_layer_types(tmp_path: Path, cli) -> None:
    """Read back with AutoConfig.from_pretrained, as transformers reads the file (the published
    ``time_step_limit`` holds transformers 5's ``{"__float__": "Infinity"}`` spelling)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = published("granite-4.0-h-350m-resaved.json")
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "attention"] == GRANITE_H_ATTN
    assert cfg["num_local_experts"] == 0 and cfg["position_embedding_type"] == "nope"
    cfg |= SMALL | {"shared_intermediate_size": 37, "mamba_n_heads": 4, "mamba_d_head": 16}
    cfg |= {"mamba_d_state": 8, "mamba_chunk_size": 8}
    shrunk = tmp_path / "config"
    shrunk.mkdir()
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside the tiny vocabulary
    (shrunk / "config.json").write_text(json.dumps(cfg | ids))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shrunk))
    pre, post = save_pair(model, tmp_path, cfg)

    info = inspect_json(cli, post)
    assert info["adapter"] == "granitemoehybrid"
    assert info["global_layers"] == GRANITE_H_ATTN and info["local_layers"] == []
    assert len(info["layer_reasons"]) == 32
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == GRANITE_H_ATTN
    planned = {p["name"] for p in summary["plan"]["tensors"] if p["layer"] == 10}
    base = "model.layers.10.self_attn."
    assert planned == {base + "q_proj.weight", base + "k_proj.weight"}
    post_t, _ = load_all(post)
    want = routing_rows(post_t, GRANITE_H_ATTN)
    assert len(want) == 2 * len(GRANITE_H_ATTN)
    assert_merged(out, pre, post, resolve_rows(want, post_t))
