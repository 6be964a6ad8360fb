"""Remote-code families (HypeNet, Jet-Nemotron) and the generic adapter, written by hand.

These have no transformers classes, so config.json and safetensors are written directly; their linear
layers reuse the ``q_proj``/``k_proj`` names with other shapes, which proves layers are chosen from
the config and never by tensor name. Also here: payloads that must survive bit for bit, and a PRE in
another dtype than POST.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import (
    assert_merged,
    load_all,
    perturbed,
    raw,
    resolve_rows,
    routing_rows,
    write_checkpoint,
)

HID, HEADS, KV, HD = 32, 4, 2, 8


def layer_tensors(
    i: int, softmax: bool, bias: bool, g: torch.Generator, dtype=torch.float32
) -> dict:
    p = f"model.layers.{i}."
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    t = {
        p + "input_layernorm.weight": r(HID),
        p + "mlp.up_proj.weight": r(48, HID),
        p + "mlp.down_proj.weight": r(HID, 48),
    }
    if softmax:
        t |= {
            p + "self_attn.q_proj.weight": r(HEADS * HD, HID),
            p + "self_attn.k_proj.weight": r(KV * HD, HID),
            p + "self_attn.v_proj.weight": r(KV * HD, HID),
            p + "self_attn.o_proj.weight": r(HID, HEADS * HD),
            p + "self_attn.q_norm.weight": r(HD),
            p + "self_attn.k_norm.weight": r(HD),
        }
        if bias:
            t |= {
                p + "self_attn.q_proj.bias": r(HEADS * HD),
                p + "self_attn.k_proj.bias": r(KV * HD),
                p + "self_attn.v_proj.bias": r(KV * HD),
            }
    else:  # a linear-attention mixer that happens to use the same names, with other shapes
        t |= {
            p + "self_attn.q_proj.weight": r(16, HID),
            p + "self_attn.k_proj.weight": r(16, HID),
            p + "self_attn.v_proj.weight": r(24, HID),
            p + "self_attn.o_proj.weight": r(HID, 24),
            p + "self_attn.decay": r(4),
        }
    return t


def model_tensors(kinds: list[bool], bias: bool, seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(50, HID, generator=g).to(dtype)}
    for i, softmax in enumerate(kinds):
        t |= layer_tensors(i, softmax, bias, g, dtype)
    t["model.norm.weight"] = torch.ones(HID, dtype=dtype)
    t["lm_head.weight"] = torch.randn(50, HID, generator=g).to(dtype)
    return t


def make_pair(tmp: Path, config: dict, softmax: list[bool], bias: bool = False, shards: int = 3):
    pre_t = model_tensors(softmax, bias, seed=1)
    post_t = perturbed(pre_t, seed=2)
    pre = write_checkpoint(tmp / "pre", config, pre_t, shards=shards)
    post = write_checkpoint(tmp / "post", config, post_t, shards=shards)
    return pre, post


def hypenet_config() -> dict:
    return {
        "architectures": ["HybridForCausalLM"],
        "model_type": "hypenet",
        "hidden_size": HID,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "num_hidden_layers": 5,
        "mixer_types": ["lightning-attn", "attn", "gdn", "attn", "lightning_attn"],
        "attn_use_rope": False,
    }


def test_hypenet(tmp_path: Path, cli) -> None:
    pre, post = make_pair(tmp_path, hypenet_config(), [False, True, False, True, False])
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    desc = json.loads(res.out)
    assert desc["adapter"] == "hypenet" and desc["global_layers"] == [1, 3]
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(routing_rows(post_t, [1, 3]), post_t))
    assert cli("verify", out).code == 0


def test_jet_nemotron_string_layer_types_and_swa(tmp_path: Path, cli) -> None:
    config = {
        "architectures": ["JetNemotronForCausalLM"],
        "model_type": "jet_nemotron",
        "hidden_size": HID,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "num_hidden_layers": 4,
        "layer_types": "['jet', 'attn', 'swa', 'jet']",
    }
    pre, post = make_pair(tmp_path, config, [False, True, True, False], bias=True)
    desc = json.loads(cli("inspect-layers", post, "--json").out)
    assert desc["global_layers"] == [1] and desc["local_layers"] == [2]
    post_t, _ = load_all(post)

    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    expected = resolve_rows(routing_rows(post_t, [1]), post_t)
    assert "model.layers.1.self_attn.q_proj.bias" in expected
    assert_merged(out, pre, post, expected)

    out2 = tmp_path / "out2"
    assert cli("merge", pre, post, "-o", out2, "--include-sliding", "--quiet").code == 0
    assert_merged(out2, pre, post, resolve_rows(routing_rows(post_t, [1, 2]), post_t))


def test_jet_nemotron_layer_types_string_is_never_evaluated(tmp_path: Path, cli) -> None:
    config = {
        "model_type": "jet_nemotron",
        "num_hidden_layers": 2,
        "layer_types": "__import__('os').system('touch pwned')",
    }
    _, post = make_pair(tmp_path, config, [False, True])
    res = cli("inspect-layers", post)
    assert res.code == 2
    assert "layer_types" in res.err and len(res.err_lines) == 1
    assert not Path("pwned").exists()


def test_generic_adapter_for_unknown_model_type(tmp_path: Path, cli) -> None:
    config = {
        "model_type": "brand_new_hybrid",
        "num_hidden_layers": 3,
        "layer_types": ["linear_attention", "full_attention", "sliding_attention"],
    }
    pre, post = make_pair(tmp_path, config, [False, True, True])
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out)
    assert res.code == 0, res.err
    assert "generic" in res.err  # the user is told which adapter was used
    post_t, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(routing_rows(post_t, [1]), post_t))


def test_unknown_family_without_layer_types_is_refused(tmp_path: Path, cli) -> None:
    config = {"model_type": "mystery", "num_hidden_layers": 2}
    pre, post = make_pair(tmp_path, config, [True, True])
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2
    assert len(res.err_lines) == 1
    assert "mystery" in res.err and "qwen3_next" in res.err and "layer_types" in res.err
    assert not (tmp_path / "out").exists()


def test_layer_types_length_must_match(tmp_path: Path, cli) -> None:
    config = {"model_type": "x", "num_hidden_layers": 3, "layer_types": ["full_attention"] * 2}
    _, post = make_pair(tmp_path, config, [True, True, True])
    res = cli("inspect-layers", post)
    assert res.code == 2 and "num_hidden_layers" in res.err


def test_negative_zero_and_nan_payloads_survive(tmp_path: Path, cli) -> None:
    config = {"model_type": "x", "num_hidden_layers": 1, "layer_types": ["full_attention"]}
    pre_t = model_tensors([True], False, seed=3)
    post_t = perturbed(pre_t, seed=4)
    odd = torch.tensor([0x80000000, 0x7FC00123, 0xFFC0BEEF, 0x7F800001], dtype=torch.int64)
    odd = odd.to(torch.int32).view(
        torch.float32
    )  # -0.0, quiet NaNs with payloads, a signalling NaN
    pre_t["model.layers.0.self_attn.q_proj.weight"][0, :4] = odd
    post_t["model.layers.0.mlp.up_proj.weight"][0, :4] = odd
    post_t["model.layers.0.self_attn.q_proj.weight"][1, :4] = odd
    pre = write_checkpoint(tmp_path / "pre", config, pre_t)
    post = write_checkpoint(tmp_path / "post", config, post_t)
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    got, _ = load_all(out)
    assert raw(got["model.layers.0.self_attn.q_proj.weight"][0, :4]) == raw(odd)
    assert raw(got["model.layers.0.mlp.up_proj.weight"][0, :4]) == raw(odd)
    post_got, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(routing_rows(post_got, [0]), post_got))


def test_pre_float32_post_bfloat16_is_cast_and_announced(tmp_path: Path, cli) -> None:
    config = {"model_type": "x", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
    pre_t = model_tensors([True, True], False, seed=5, dtype=torch.float32)
    post_t = {n: t.to(torch.bfloat16) for n, t in perturbed(pre_t, seed=6).items()}
    pre = write_checkpoint(tmp_path / "pre", config, pre_t, shards=2)
    post = write_checkpoint(tmp_path / "post", config, post_t, shards=2)
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out)
    assert res.code == 0, res.err
    assert "F32→BF16" in res.err
    got, _ = load_all(out)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    post_got, _ = load_all(post)
    assert_merged(out, pre, post, resolve_rows(routing_rows(post_got, [0, 1]), post_got), cast=True)
    assert cli("verify", out).code == 0


def test_tensor_pattern_for_an_unknown_family(tmp_path: Path, cli) -> None:
    config = {"model_type": "mystery", "num_hidden_layers": 3}
    pre, post = make_pair(tmp_path, config, [True, True, True])
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and "--tensor-pattern" in res.err
    pattern = r"model\.layers\.{i}\.self_attn\.(q|k)_proj\.weight"
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--tensor-pattern", pattern)
    assert res.code == 2 and "--layers" in res.err
    res = cli(
        "merge", pre, post, "-o", tmp_path / "out", "--layers", "0,2", "--tensor-pattern", pattern
    )
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    expected = {
        f"model.layers.{i}.self_attn.{p}_proj.weight": [
            (0, post_t[f"model.layers.{i}.self_attn.{p}_proj.weight"].shape[0])
        ]
        for i in (0, 2)
        for p in ("q", "k")
    }
    assert_merged(tmp_path / "out", pre, post, expected)
    res = cli(
        "merge", pre, post, "-o", tmp_path / "o2", "--layers", "1", "--tensor-pattern", "nothing"
    )
    assert res.code == 2 and "matches no tensor" in res.err


def fp8_model(seed: int, scale_value: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        for name, rows in (("q_proj", 256), ("k_proj", 128), ("v_proj", 128)):
            w = torch.randn(rows, HID, generator=g).to(torch.float8_e4m3fn)
            t[p + name + ".weight"] = w
            t[p + name + ".weight_scale_inv"] = torch.full((rows // 128, 1), scale_value + i)
        t[p + "o_proj.weight"] = torch.randn(HID, 256, generator=g).to(torch.bfloat16)
    t["lm_head.weight"] = torch.randn(50, HID, generator=g).to(torch.bfloat16)
    return t


def test_fp8_weights_bring_their_block_scales(tmp_path: Path, cli) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": HID}
    pre = write_checkpoint(tmp_path / "pre", config, fp8_model(1, 0.5))
    post = write_checkpoint(tmp_path / "post", config, fp8_model(2, 0.25), shards=2)
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--json")
    assert res.code == 0, res.err
    roles = {t["name"]: t["role"] for t in json.loads(res.out)["plan"]["tensors"]}
    assert roles["model.layers.1.self_attn.q_proj.weight_scale_inv"] == "scale"
    expected = {
        f"model.layers.{i}.self_attn.{p}_proj.{s}": [(0, 10**9)]
        for i in (0, 1)
        for p in ("q", "k")
        for s in ("weight", "weight_scale_inv")
    }
    post_t, _ = load_all(post)
    assert_merged(tmp_path / "out", pre, post, resolve_rows(expected, post_t))


def test_fp8_and_bf16_checkpoints_cannot_be_mixed(tmp_path: Path, cli) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": HID}
    pre_t = {
        n: (t.to(torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t)
        for n, t in fp8_model(1, 0.5).items()
    }
    pre = write_checkpoint(tmp_path / "pre", config, pre_t)
    post = write_checkpoint(tmp_path / "post", config, fp8_model(2, 0.25))
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and "quantisation" in res.err
    assert not (tmp_path / "out").exists()
