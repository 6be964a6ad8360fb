"""Adapters against configs as published on the Hub (tests/fixtures/hub_configs, sources in SOURCES.md).

For each published config the test states the layer map the model card and config describe, then
builds a tiny pair whose ``config.json`` is the published one with only the sizes shrunk (layer-map
fields, legacy spellings, windows, ``quantization_config`` and ``auto_map`` untouched), merges it
through the CLI and compares bytes with its own statement of the routing set. The window rule (a
sliding window at least as long as the context is global) is tested here too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_merged, load_all, perturbed, resolve_rows, routing_rows
from conftest import write_checkpoint as write_hand

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs"
# Fields that describe the saved file rather than the model, left out when transformers builds it.
META = {"architectures", "transformers_version", "torch_dtype", "quantization_config", "auto_map"}
META |= {"_name_or_path", "pad_token_id", "bos_token_id", "eos_token_id", "initial_context_length"}
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 99,
}


def save_pair(model: torch.nn.Module, root: Path, cfg: dict) -> tuple[Path, Path]:
    """PRE = ``model``; POST = PRE + noise, sharded; both with the published ``config.json``
    (transformers' re-serialisation would drop or rename published fields)."""
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(post, max_shard_size="200KB")
    for folder in (pre, post):
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return pre, post


def published(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _range(n: int) -> list[int]:
    return list(range(n))


# fixture → (size overrides, expected global layers, expected local layers), stated from the model
# cards and release notes, not read back through qkrestore.
HF_BUILT = {
    # openai/gpt-oss-20b: 24 layers, sliding (window 128) on even layers, full on odd ones
    "gpt-oss-20b.json": (
        SMALL
        | {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 32,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "experts_per_token": 1,
        },
        list(range(1, 24, 2)),
        list(range(0, 24, 2)),
    ),
    # Phi-3.5-mini: a 262144 window over a 131072 context never slides: all 32 layers global.
    # head_dim stays 96 (hidden 192 / 2 heads): longrope's 48 factors are per rotary pair.
    "phi-3.5-mini-instruct.json": (
        SMALL | {"hidden_size": 192, "num_key_value_heads": 2},
        _range(32),
        [],
    ),
    "llama-3.1-8b.json": (SMALL, _range(32), []),
    # Qwen2.5-7B: sliding_window 131072 but use_sliding_window false: every layer full
    "qwen2.5-7b.json": (SMALL, _range(28), []),
    "qwen3-4b.json": (SMALL | {"head_dim": 16}, _range(36), []),
    # qwen3_moe has no adapter: derived from transformers, all 48 layers full
    "qwen3-30b-a3b.json": (
        SMALL
        | {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 12},
        _range(48),
        [],
    ),
    # mistralai/Mixtral-8x7B-v0.1: sliding_window null, all 32 layers full; no layer_types and no
    # adapter: derived from transformers
    # ibm-granite/granite-3.1-1b-a400m-instruct: granitemoe, 24 layers all full (no window, no
    # layer_types, no adapter): derived from transformers
    "granite-3.1-1b-a400m-instruct.json": (
        SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2},
        _range(24),
        [],
    ),
    "mixtral-8x7b-v0.1.json": (
        SMALL | {"num_local_experts": 2, "num_experts_per_tok": 1},
        _range(32),
        [],
    ),
}


def build_pair(
    root: Path, cfg: dict, model_type: str | None = None, auto=None, token_ids: bool = True
) -> tuple[Path, Path]:
    """A tiny PRE/POST from transformers' classes (``auto``: AutoModelForCausalLM unless given),
    built from ``cfg`` without the saved-file fields; config.json is ``cfg`` itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k not in META and k != "model_type"}
    if token_ids:
        kwargs |= {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type or cfg["model_type"], **kwargs)
    return save_pair((auto or AutoModelForCausalLM).from_config(config), root, cfg)


def build_published_pair(root: Path, name: str, overrides: dict) -> tuple[Path, Path, dict]:
    """A tiny PRE/POST from transformers' classes; config.json is the published one, shrunk."""
    cfg = published(name) | overrides
    pre, post = build_pair(root, cfg)
    return pre, post, cfg


def merge_json(cli, pre: Path, post: Path, out: Path, *extra) -> dict:
    """``merge --json`` of PRE and POST into ``out``, which must succeed: its summary."""
    r = cli("merge", pre, post, "-o", out, "--json", *extra)
    assert r.code == 0, r.err
    return json.loads(r.out)


def inspect_json(cli, path: Path) -> dict:
    """``inspect-layers --json`` of ``path``, which must succeed."""
    r = cli("inspect-layers", path, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def _check_merge(cli, tmp: Path, pre: Path, post: Path, want: list[int], extra=()) -> dict:
    out = tmp / "out"
    summary = merge_json(cli, pre, post, out, *extra)
    assert summary["layers"] == want
    post_t, _ = load_all(post)
    expected = resolve_rows(routing_rows(post_t, want), post_t)
    for i in want:  # gpt-oss: one sink logit per query head, routing (owned by q)
        name = f"model.layers.{i}.self_attn.sinks"
        if name in post_t:
            expected[name] = [(0, post_t[name].shape[0])]
        # Phi-3's fused qkv_proj: rows [Q: H·hd | K: KV·hd | V: KV·hd]; Q and K are routing
        name = f"model.layers.{i}.self_attn.qkv_proj.weight"
        if name in post_t:
            hidden = post_t["model.embed_tokens.weight"].shape[1]
            v_rows = (post_t[name].shape[0] - hidden) // 2
            expected[name] = [(0, post_t[name].shape[0] - v_rows)]
    assert expected
    assert_merged(out, pre, post, expected)
    return summary


@pytest.mark.parametrize("name", sorted(HF_BUILT))
def test_published_config_layer_map_and_merge(tmp_path: Path, cli, name: str) -> None:
    overrides, want_global, want_local = HF_BUILT[name]
    pre, post, cfg = build_published_pair(tmp_path, name, overrides)
    info = inspect_json(cli, post)
    assert info["global_layers"] == want_global
    assert info["local_layers"] == want_local
    assert len(info["layer_reasons"]) == cfg["num_hidden_layers"]
    _check_merge(cli, tmp_path, pre, post, want_global)


def test_gpt_oss_routing_names_match_the_published_index(tmp_path: Path, cli) -> None:
    """The tensors planned for a global layer are named as in openai/gpt-oss-20b's own index."""
    overrides = HF_BUILT["gpt-oss-20b.json"][0]
    pre, post, _ = build_published_pair(tmp_path, "gpt-oss-20b.json", overrides)
    summary = _check_merge(cli, tmp_path, pre, post, list(range(1, 24, 2)))
    index = json.loads((FIXTURES / "gpt-oss-20b.index-layers-0-1.json").read_text())
    planned = {p["name"] for p in summary["plan"]["tensors"] if p["layer"] == 1}
    assert planned == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.1.self_attn.sinks",
    }
    assert planned <= set(index["weight_map"])


# -- remote-code families: checkpoints written by hand with the published configs ----------------


def _hand_tensors(cfg: dict, attn_layers: list[int], bias: bool, norms: bool) -> dict:
    """Every layer has self_attn.{q,k,v,o}_proj (linear mixers share the names), plus extras."""
    g = torch.Generator().manual_seed(1)
    hidden, heads, kv, hd = 32, 2, 1, 16

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": t(99, hidden), "model.norm.weight": t(hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        out |= {
            p + "q_proj.weight": t(heads * hd, hidden),
            p + "k_proj.weight": t(kv * hd, hidden),
            p + "v_proj.weight": t(kv * hd, hidden),
            p + "o_proj.weight": t(hidden, heads * hd),
            f"model.layers.{i}.mlp.down_proj.weight": t(hidden, 37),
        }
        if i in attn_layers and bias:
            out |= {p + "q_proj.bias": t(heads * hd), p + "k_proj.bias": t(kv * hd)}
            out |= {p + "v_proj.bias": t(kv * hd)}
        if norms:
            out |= {p + "q_norm.weight": t(hd), p + "k_norm.weight": t(hd)}
        if i in attn_layers and "o_gate" in json.dumps(cfg):
            out[p + "o_gate.weight"] = t(heads * hd, hidden)
    return out


REMOTE = {
    # Jet-Nemotron-2B: full attention at 14 and 19, sliding window (1152) at 20 and 21
    "jet-nemotron-2b.json": ([14, 19], [20, 21], True, False),
    # Jet-Nemotron-4B: full at 17, 20, 32; sliding window (2048 < 32768) at 5, 16, 19, 21, 22, 25, 27
    "jet-nemotron-4b.json": ([17, 20, 32], [5, 16, 19, 21, 22, 25, 27], True, False),
    # HypeNet-2B: softmax attention at 2, 3, 6, 8, 9, 21, 25 (NoPE), lightning elsewhere
    "hypenet-2b.json": ([2, 3, 6, 8, 9, 21, 25], [], False, True),
}


def _shrunk(name: str) -> dict:
    cfg = published(name) | SMALL
    if "head_dim" in cfg:
        cfg["head_dim"] = 16
    return cfg


@pytest.mark.parametrize("name", sorted(REMOTE))
def test_published_remote_code_config(tmp_path: Path, cli, name: str) -> None:
    want_global, want_local, bias, norms = REMOTE[name]
    cfg = _shrunk(name)
    tensors = _hand_tensors(cfg, want_global + want_local, bias, norms)
    pre = write_hand(tmp_path / "pre", cfg, tensors)
    post = write_hand(tmp_path / "post", cfg, perturbed(tensors, seed=3), shards=3)
    info = inspect_json(cli, post)
    assert info["global_layers"] == want_global and info["local_layers"] == want_local
    window = cfg.get("efficient_attention_config", {}).get("swa", {}).get("window_size")
    for i in want_local:
        assert (
            f"window_size {window} < context {cfg['max_position_embeddings']}"
            in (info["layer_reasons"][i])
        )
    _check_merge(cli, tmp_path, pre, post, want_global)
    if want_local:
        r = cli("merge", pre, post, "-o", tmp_path / "all", "--include-sliding", "--json")
        assert json.loads(r.out)["layers"] == sorted(want_global + want_local)


# -- errors and new families ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "drop", "field"),
    [
        ("hypenet-2b.json", "mixer_types", "'mixer_types'"),
        ("jet-nemotron-2b.json", "layer_types", "'layer_types'"),
    ],
)
def test_unreadable_layer_map_names_the_field(
    tmp_path: Path, cli, name: str, drop: str, field: str
) -> None:
    cfg = _shrunk(name)
    del cfg[drop]
    post = write_hand(tmp_path / "m", cfg, _hand_tensors(cfg, [], False, False))
    r = cli("inspect-layers", post)
    assert r.code == 2
    assert len(r.err_lines) == 1 and field in r.err and "config.json" in r.err


def test_layer_list_length_must_match(tmp_path: Path, cli) -> None:
    cfg = _shrunk("jet-nemotron-2b.json") | {"num_hidden_layers": 27}
    post = write_hand(tmp_path / "m", cfg, _hand_tensors(cfg, [], False, False))
    r = cli("inspect-layers", post)
    assert r.code == 2
    assert "the layer list has 28 entries but num_hidden_layers is 27" in r.err


def test_new_family_with_layer_types_uses_the_generic_adapter(tmp_path: Path, cli) -> None:
    """A model_type qkrestore does not know, with transformers' layer_types: generic, told."""
    overrides = HF_BUILT["gpt-oss-20b.json"][0]
    pre, post, cfg = build_published_pair(tmp_path, "gpt-oss-20b.json", overrides)
    renamed = copy.deepcopy(cfg) | {
        "model_type": "gpt_oss_next_gen",
        "architectures": ["GptOssNextGenForCausalLM"],
    }
    for folder in (pre, post):
        (folder / "config.json").write_text(json.dumps(renamed, indent=2))
    info = inspect_json(cli, post)
    assert info["adapter"] == "generic"
    assert info["global_layers"] == list(range(1, 24, 2))
    r = cli("merge", pre, post, "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert "generic adapter" in r.err


# -- the window rule --------------------------------------------------------------------------


def test_phi3_window_longer_than_context_is_global(tmp_path: Path, cli) -> None:
    overrides = HF_BUILT["phi-3.5-mini-instruct.json"][0]
    pre, post, _ = build_published_pair(tmp_path, "phi-3.5-mini-instruct.json", overrides)
    info = inspect_json(cli, post)
    assert info["global_layers"] == _range(32)
    assert info["layer_reasons"][0] == (
        "sliding_window 262144 ≥ context 131072: the window never slides, global"
    )
    _check_merge(cli, tmp_path, pre, post, _range(32))


@pytest.mark.parametrize(
    ("window", "context", "kind", "reason"),
    [
        (4096, 4096, "global", "sliding_window 4096 ≥ context 4096"),
        (4096, 32768, "local", "sliding_window 4096 < context 32768: local"),
    ],
)
def test_mistral_window_against_its_context(
    tmp_path: Path, cli, window: int, context: int, kind: str, reason: str
) -> None:
    """Mistral-7B-v0.1 (window 4096, context 32768) stays local; a 4096 context makes it global."""
    from conftest import build_hf_pair

    kwargs = {"num_hidden_layers": 2, "sliding_window": window, "max_position_embeddings": context}
    pre, post = build_hf_pair(tmp_path, "mistral", kwargs)
    info = inspect_json(cli, post)
    assert info[f"{kind}_layers"] == [0, 1]
    assert all(reason in why for why in info["layer_reasons"])
    shown = cli("inspect-layers", post).out  # the human view says why, once for both layers
    assert sum("why layers 0-1: " in line and reason in line for line in shown.splitlines()) == 1
    r = cli("merge", pre, post, "-o", tmp_path / "out")
    assert (r.code == 0) is (kind == "global"), r.err


def test_kimi_linear_published_prefix(tmp_path: Path, cli) -> None:
    """Kimi-Linear-48B-A3B's published layer lists (1-based, in linear_attn_config) with a
    compressed-tensors quantization_config: MLA at 0-based 3, 7, 11, 15, 19, 23, 26."""
    sizes = SMALL | {"num_key_value_heads": 2, "kv_lora_rank": 8, "qk_rope_head_dim": 4}
    sizes |= {"qk_nope_head_dim": 8, "v_head_dim": 8, "num_experts": 4}
    sizes |= {"num_experts_per_token": 2, "moe_intermediate_size": 12}
    cfg = published("kimi-linear-48b-a3b-instruct-nvfp4.prefix.json") | sizes
    cfg["linear_attn_config"] = cfg["linear_attn_config"] | {"num_heads": 2, "head_dim": 8}

    pre, post = build_pair(tmp_path, cfg, "kimi_linear")

    mla = [3, 7, 11, 15, 19, 23, 26]
    info = inspect_json(cli, post)
    assert info["adapter"] == "kimi_linear" and info["global_layers"] == mla
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == mla
    # the test's own MLA statement: q_proj whole (q_lora_rank null); K = rope rows [r, r + rope) of
    # kv_a_proj_with_mqa and, per head, the first nope rows of kv_b_proj's [nope + v] block
    heads, nope, rope, v, r_ = 2, 8, 4, 8, 8
    expected: dict[str, list] = {}
    for i in mla:
        a = f"model.layers.{i}.self_attn."
        expected[a + "q_proj.weight"] = [(0, heads * (nope + rope))]
        expected[a + "kv_a_proj_with_mqa.weight"] = [(r_, r_ + rope)]
        expected[a + "kv_b_proj.weight"] = [
            (h * (nope + v), h * (nope + v) + nope) for h in range(2)
        ]
    assert_merged(out, pre, post, expected)


# -- a VLM-nested config: google/medgemma-27b-it (Gemma 3, text_config inside) -----------------

# medgemma-27b-it's text model: 62 layers, a full-attention layer every sixth (5, 11, ..., 59), the
# others sliding with window 1024 over a 131072 context (layer_types as published)
MEDGEMMA_GLOBAL = list(range(5, 62, 6))
MEDGEMMA_LOCAL = [i for i in range(62) if i not in MEDGEMMA_GLOBAL]


def _medgemma_shrunk() -> dict:
    cfg = published("medgemma-27b-it.json")
    cfg["text_config"] = cfg["text_config"] | SMALL | {"head_dim": 16}
    cfg["vision_config"] = cfg["vision_config"] | {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": 28,
    }
    return cfg | {"mm_tokens_per_image": 4}


def test_medgemma_vlm_nested_config_layer_map_and_merge(tmp_path: Path, cli) -> None:

    cfg = _medgemma_shrunk()
    pre, post = build_pair(tmp_path, cfg, "gemma3", token_ids=False)

    info = inspect_json(cli, post)
    assert info["global_layers"] == MEDGEMMA_GLOBAL
    assert info["local_layers"] == MEDGEMMA_LOCAL
    assert "1024 < context 131072" in info["layer_reasons"][0]
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == MEDGEMMA_GLOBAL
    post_t, _ = load_all(post)
    prefix = "language_model.model.layers."  # transformers saves Gemma 3 in the published layout
    expected = resolve_rows(routing_rows(post_t, MEDGEMMA_GLOBAL, prefix=prefix), post_t)
    assert len(expected) == 4 * len(MEDGEMMA_GLOBAL)  # q, k, q_norm, k_norm
    assert_merged(out, pre, post, expected)


def test_medgemma_published_tensor_names(tmp_path: Path, cli) -> None:
    """The published shards name the text model ``language_model.model.layers.N`` (the layout
    before transformers 5); the routing set uses exactly the index's names."""
    cfg = _medgemma_shrunk()
    index = json.loads((FIXTURES / "medgemma-27b-it.index-layers-4-5.json").read_text())
    g = torch.Generator().manual_seed(2)
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32)}
    shapes |= {"q_norm": (16,), "k_norm": (16,), "down_proj": (32, 37)}
    shapes |= {"gate_proj": (37, 32), "up_proj": (37, 32)}
    tensors = {"language_model.model.embed_tokens.weight": torch.randn(99, 32, generator=g)}
    for i in range(62):  # every layer named like the index's layer 4 (sliding) or 5 (full)
        model_layer = ".layers.5." if i in MEDGEMMA_GLOBAL else ".layers.4."
        for name in index["weight_map"]:
            if model_layer in name:
                leaf = name.split(".")[-2]
                t = torch.randn(*shapes.get(leaf, (32,)), generator=g).to(torch.bfloat16)
                tensors[name.replace(model_layer, f".layers.{i}.")] = t
    pre = write_hand(tmp_path / "pre", cfg, tensors)
    post = write_hand(tmp_path / "post", cfg, perturbed(tensors, seed=3), shards=2)
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    planned = {p["name"] for p in summary["plan"]["tensors"] if p["layer"] == 5}
    base = "language_model.model.layers.5.self_attn."
    assert planned == {
        base + s for s in ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight")
    }
    assert planned <= set(index["weight_map"])
    want = routing_rows(tensors, MEDGEMMA_GLOBAL, prefix="language_model.model.layers.")
    assert_merged(out, pre, post, resolve_rows(want, tensors))


# -- Qwen3.6-27B (qwen3_5, dense), VLM-nested, with a compressed-tensors quantization_config --------

QWEN36 = "qwen3.6-27b-int4-fantasylord.json"
QWEN36_FULL = list(range(3, 64, 4))  # layer_types: full attention every fourth layer, of 64


def test_qwen36_vlm_nested_quantized_config_layer_map_and_merge(tmp_path: Path, cli) -> None:
    """The gated q_proj (attn_output_gate) keeps each head's query rows and leaves its gate rows."""
    from transformers import AutoModelForImageTextToText

    cfg = published(QWEN36)
    cfg["text_config"] = cfg["text_config"] | SMALL | {"head_dim": 16, "linear_key_head_dim": 8}
    cfg["text_config"] |= {"linear_value_head_dim": 8, "linear_num_key_heads": 1}
    cfg["text_config"] |= {"linear_num_value_heads": 2}
    cfg["vision_config"] = cfg["vision_config"] | {"depth": 1, "hidden_size": 16, "num_heads": 2}
    cfg["vision_config"] |= {"intermediate_size": 16, "out_hidden_size": 32}
    pre, post = build_pair(
        tmp_path, cfg, "qwen3_5", auto=AutoModelForImageTextToText, token_ids=False
    )

    info = inspect_json(cli, post)
    assert info["global_layers"] == QWEN36_FULL and info["local_layers"] == []
    out = tmp_path / "out"
    summary = merge_json(cli, pre, post, out)
    assert summary["layers"] == QWEN36_FULL
    post_t, _ = load_all(post)
    prefix = next(n for n in post_t if ".layers.3.self_attn.q_proj" in n).split("3.self_attn")[0]
    want = routing_rows(post_t, QWEN36_FULL, prefix=prefix, gated_heads=(2, 16))
    assert len(want) == 4 * len(QWEN36_FULL)  # q (query rows only), k, q_norm, k_norm
    assert_merged(out, pre, post, resolve_rows(want, post_t))


# -- GPT-NeoX (RedPajama-INCITE-7B-Base), Mistral-7B-v0.1 (a re-shard), Falcon-40B (RefinedWeb) ---


def test_redpajama_gpt_neox_fused_qkv(tmp_path: Path, cli) -> None:
    """GPT-NeoX's query_key_value holds, per head, [q | k | v] rows of head_dim each: Q and K rows
    of every head come from PRE, the V rows stay POST's."""
    sizes = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37}
    pre, post, _ = build_published_pair(
        tmp_path, "redpajama-incite-7b-base.json", sizes | {"vocab_size": 99}
    )
    info = inspect_json(cli, post)
    assert info["adapter"] == "gpt_neox" and info["global_layers"] == _range(32)
    out = tmp_path / "out"
    merge_json(cli, pre, post, out)
    hd = 16
    rows = [(3 * hd * j, 3 * hd * j + 2 * hd) for j in range(2)]
    expected = {}
    for i in range(32):
        for leaf in ("weight", "bias"):
            expected[f"gpt_neox.layers.{i}.attention.query_key_value.{leaf}"] = rows
    assert_merged(out, pre, post, expected)


def test_mistral_7b_published_window_is_local(tmp_path: Path, cli) -> None:
    """Mistral-7B-v0.1: sliding_window 4096 < max_position_embeddings 32768, so every layer is
    local; a default merge has nothing to restore and says so, --include-sliding takes all 32."""
    sizes = SMALL | {"num_key_value_heads": 1}
    pre, post, _ = build_published_pair(tmp_path, "mistral-7b-v0.1-resharded.json", sizes)
    info = inspect_json(cli, post)
    assert info["global_layers"] == [] and info["local_layers"] == _range(32)
    assert all("sliding_window 4096 < context 32768" in why for why in info["layer_reasons"])
    r = cli("merge", pre, post, "-o", tmp_path / "refused")
    assert r.code != 0 and not (tmp_path / "refused").exists()
    _check_merge(cli, tmp_path, pre, post, _range(32), extra=("--include-sliding",))


def test_falcon_40b_legacy_refinedweb_config(tmp_path: Path, cli) -> None:
    """falcon-40b as first published: model_type 'RefinedWeb' (remote code) with n_head, n_head_kv
    and n_layer. Its query_key_value is grouped like FalconConfig's new_decoder_architecture: per
    KV group [q x (heads / groups) | k | v], here 2 groups of [2 x q | k | v] with head_dim 8."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = published("falcon-40b.json") | {"hidden_size": 32, "n_head": 4, "n_head_kv": 2}
    cfg |= {"vocab_size": 99}
    torch.manual_seed(0)
    model = FalconForCausalLM(  # the same model in FalconConfig's names
        FalconConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_kv_heads=2,
            num_hidden_layers=60,
            new_decoder_architecture=True,
            bias=False,
            parallel_attn=True,
            vocab_size=99,
        )
    )
    pre, post = save_pair(model, tmp_path, cfg)

    info = inspect_json(cli, post)
    assert info["adapter"] == "falcon" and info["global_layers"] == _range(60)
    out = tmp_path / "out"
    merge_json(cli, pre, post, out)
    rows = [(0, 24), (32, 56)]  # per group: 2 query heads and the key head (8 rows each), not v
    expected = {f"transformer.h.{i}.self_attention.query_key_value.weight": rows for i in range(60)}
    assert_merged(out, pre, post, expected)
