"""Fused-QKV families: Phi-3, GPT-NeoX, Falcon (three layouts) and InternLM2 (remote code, by hand).

The Q, K and V rows of each fused tensor are derived here, independently of qkrestore, by pushing an
index tensor ``arange(rows)`` through the model's own split (Falcon's ``_split_heads``; the
view/slice lines of the Phi-3 and GPT-NeoX attention modules, with sizes read from the modules; the
``rearrange`` of InternLM2's remote code). Each merge is then checked byte for byte, its layer map
against what transformers' attention actually does, and its attention probabilities against a
reference built by plain state-dict surgery.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_merged, load_all, perturbed, quiet_transformers, write_checkpoint

Rows = list[tuple[int, int]]

# conftest.TINY without num_key_value_heads (GPT-NeoX and Falcon have no such field), 4 heads of 8.
HF_BASE = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
IDS = torch.tensor([[5, 17, 42, 8, 23, 61, 3, 77, 12, 9]])  # longer than the sliding window below


@dataclass
class Case:
    model_type: str
    kwargs: dict
    prefix: str  # up to the layer index
    attn: str  # the attention module and fused tensor, relative to the layer
    o: str
    bias: bool
    layout: dict[str, Rows] | None = None  # the same rows written out, for 4 heads of 8


def per_head(heads: int, hd: int) -> dict[str, Rows]:
    return {
        t: [(h * 3 * hd + j * hd, h * 3 * hd + (j + 1) * hd) for h in range(heads)]
        for j, t in enumerate("qkv")
    }


CASES = {
    "phi3": Case(
        "phi3",
        {"num_hidden_layers": 2, "num_key_value_heads": 2},
        "model.layers.",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        bias=False,
        layout={"q": [(0, 32)], "k": [(32, 48)], "v": [(48, 64)]},
    ),
    "gpt_neox": Case(
        "gpt_neox",
        {"num_hidden_layers": 2},
        "gpt_neox.layers.",
        "attention.query_key_value",
        "attention.dense",
        bias=True,
        layout=per_head(4, 8),
    ),
    "falcon_new_decoder": Case(
        "falcon",
        {"num_hidden_layers": 2, "new_decoder_architecture": True, "num_kv_heads": 2, "bias": True},
        "transformer.h.",
        "self_attention.query_key_value",
        "self_attention.dense",
        bias=True,
        layout={"q": [(0, 16), (32, 48)], "k": [(16, 24), (48, 56)], "v": [(24, 32), (56, 64)]},
    ),
    "falcon_multi_query": Case(
        "falcon",
        {"num_hidden_layers": 2, "multi_query": True},
        "transformer.h.",
        "self_attention.query_key_value",
        "self_attention.dense",
        bias=False,
        layout={"q": [(0, 32)], "k": [(32, 40)], "v": [(40, 48)]},
    ),
    "falcon_per_head": Case(
        "falcon",
        {"num_hidden_layers": 2, "multi_query": False, "bias": True},
        "transformer.h.",
        "self_attention.query_key_value",
        "self_attention.dense",
        bias=True,
        layout=per_head(4, 8),
    ),
}


# -- the test's own reading of each layout -------------------------------------------------------


def runs(indices: torch.Tensor) -> Rows:
    """The sorted distinct row indices in ``indices`` as half-open ranges of consecutive rows."""
    out: Rows = []
    for i in sorted({int(x) for x in indices.flatten().tolist()}):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def union(*parts: Rows) -> Rows:
    return runs(torch.cat([torch.arange(a, b) for rows in parts for a, b in rows]))


def hf_qkv_rows(config) -> dict[str, Rows]:
    """Q/K/V rows of the fused tensor, from the model's own split applied to ``arange(rows)``."""
    if config.model_type == "falcon":
        from transformers.models.falcon.modeling_falcon import FalconAttention

        attn = FalconAttention(config, layer_idx=0)
        idx = torch.arange(attn.query_key_value.weight.shape[0], dtype=torch.float32)
        q, k, v = attn._split_heads(idx.view(1, 1, -1))
    elif config.model_type == "gpt_neox":
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

        attn = GPTNeoXAttention(config, layer_idx=0)
        idx = torch.arange(attn.query_key_value.weight.shape[0])
        # GPTNeoXAttention.forward: view(..., -1, 3 * head_size).transpose(1, 2).chunk(3, dim=-1)
        qkv = idx.view(1, 1, -1, 3 * attn.head_size).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
    elif config.model_type == "phi3":
        from transformers.models.phi3.modeling_phi3 import Phi3Attention

        attn = Phi3Attention(config, layer_idx=0)
        idx = torch.arange(attn.qkv_proj.weight.shape[0])
        # Phi3Attention.forward
        query_pos = attn.config.num_attention_heads * attn.head_dim
        q = idx[..., :query_pos]
        k = idx[..., query_pos : query_pos + attn.num_key_value_heads * attn.head_dim]
        v = idx[..., query_pos + attn.num_key_value_heads * attn.head_dim :]
    else:  # pragma: no cover
        raise AssertionError(config.model_type)
    rows = {"q": runs(q), "k": runs(k), "v": runs(v)}
    assert union(*rows.values()) == [(0, idx.numel())], "the split should cover every row once"
    return rows


def expected_rows(case: Case, layers: list[int], qkv: dict[str, Rows], targets: str) -> dict:
    rows = union(*(qkv[t] for t in targets if t in qkv))
    out: dict[str, Rows] = {}
    for i in layers:
        base = f"{case.prefix}{i}."
        if rows:
            out[base + case.attn + ".weight"] = rows
            if case.bias:
                out[base + case.attn + ".bias"] = rows
        if "o" in targets:
            out[base + case.o + ".weight"] = [(0, 10**9)]
            if case.bias:
                out[base + case.o + ".bias"] = [(0, 10**9)]
    return out


def clip(expected: dict, tensors: dict) -> dict:
    return {n: [(a, min(b, tensors[n].shape[0])) for a, b in r] for n, r in expected.items()}


# -- building and running tiny transformers models -----------------------------------------------


def build_pair(root: Path, case: Case, seed: int = 0, noise: float = 0.01) -> tuple[Path, Path]:
    """PRE from transformers' own classes; POST = PRE + noise on every parameter, sharded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(case.model_type, **HF_BASE, **case.kwargs)
    model = AutoModelForCausalLM.from_config(config)
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(post, max_shard_size="20KB")
    return pre, post


def attentions(model_dir: Path, state_dict: dict | None = None) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS, output_attentions=True)
    assert out.attentions and all(a is not None for a in out.attentions), "no probabilities"
    return out.attentions


def hf_global_layers(attns: tuple[torch.Tensor, ...]) -> list[int]:
    """transformers' own view: a layer is global when the last token still sees the first one."""
    return [i for i, a in enumerate(attns) if bool((a[0, :, -1, 0] > 0).all())]


def surgery_state_dict(pre: Path, post: Path, expected: dict) -> dict:
    """POST's state dict with PRE's rows put in by hand: the test's own QK-Restore."""
    from transformers import AutoModelForCausalLM

    sd = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(post).state_dict().items()}
    pre_sd = AutoModelForCausalLM.from_pretrained(pre).state_dict()
    for name, rows in expected.items():
        assert name in sd, f"{name} is not a parameter name of the loaded model"
        for r0, r1 in rows:
            sd[name][r0:r1] = pre_sd[name][r0:r1]
    return sd


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_fused_family(name: str, tmp_path: Path, cli) -> None:
    from transformers import AutoConfig

    case = CASES[name]
    pre, post = build_pair(tmp_path, case)
    config = AutoConfig.from_pretrained(post)
    qkv = hf_qkv_rows(config)
    assert qkv == case.layout  # transformers' split agrees with the layout written out
    n = config.num_hidden_layers

    # (b) layer kinds: every layer attends globally in transformers, and inspect-layers agrees
    plain_post = attentions(post)
    assert hf_global_layers(plain_post) == list(range(n))
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    desc = json.loads(res.out)
    assert desc["global_layers"] == list(range(n)) and desc["local_layers"] == []
    # ... and shows the Q and K rows of the fused tensor (targets q and k, joined)
    qk = union(qkv["q"], qkv["k"])
    for layer in desc["layers"]:
        shown = {t["name"]: t for t in layer["tensors"]}
        fused = f"{case.prefix}{layer['layer']}.{case.attn}"
        assert set(shown) == {fused + ".weight"} | ({fused + ".bias"} if case.bias else set())
        for t in shown.values():
            assert [tuple(r) for r in t["rows"]] == qk, t

    # (a) bytes: only the Q and K rows of the fused tensors are PRE's
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    expected = expected_rows(case, list(range(n)), qkv, "qk")
    assert_merged(out, pre, post, expected)

    res = cli("verify", out, "--forward", "always")
    assert res.code == 0, res.err + res.out
    assert "forward pass: loaded" in res.out + res.err

    # (c) attention probabilities of OUT = POST with PRE's Q/K rows put in by hand, not POST's
    got = attentions(out)
    ref = attentions(post, surgery_state_dict(pre, post, expected))
    assert len(got) == len(ref) == n
    for i in range(n):
        torch.testing.assert_close(got[i], ref[i], rtol=0, atol=1e-6)
        assert not torch.allclose(got[i], plain_post[i], atol=1e-5), f"layer {i} did not change"

    # --targets q,k,v takes the whole fused tensor; v,o takes only V rows and the output projection
    for targets in ("q,k,v", "v,o"):
        out2 = tmp_path / f"out-{targets.replace(',', '')}"
        res = cli("merge", pre, post, "-o", out2, "--targets", targets, "--quiet")
        assert res.code == 0, res.err
        want = clip(expected_rows(case, list(range(n)), qkv, targets.replace(",", "")), post_t)
        assert_merged(out2, pre, post, want)


def test_phi3_sliding_window_makes_every_layer_local(tmp_path: Path, cli) -> None:
    """transformers 5.24 masks every Phi-3 layer with ``sliding_window``: all layers are local."""
    from transformers import AutoConfig

    case = Case(
        "phi3",
        {"num_hidden_layers": 2, "num_key_value_heads": 1, "sliding_window": 4},
        "model.layers.",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        bias=False,
    )
    pre, post = build_pair(tmp_path, case)
    attns = attentions(post)
    assert hf_global_layers(attns) == []
    assert all(bool((a[0, :, -1, : IDS.shape[1] - 4] == 0).all()) for a in attns)
    desc = json.loads(cli("inspect-layers", post, "--json").out)
    assert desc["global_layers"] == [] and desc["local_layers"] == [0, 1]

    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and "--include-sliding" in res.err
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--include-sliding", "--quiet").code == 0
    qkv = hf_qkv_rows(AutoConfig.from_pretrained(post))
    assert qkv["q"] == [(0, 32)] and qkv["k"] == [(32, 40)] and qkv["v"] == [(40, 48)]
    assert_merged(out, pre, post, expected_rows(case, [0, 1], qkv, "qk"))


def test_falcon_config_defaults_pick_multi_query(tmp_path: Path, cli) -> None:
    """A config.json without the layout flags is read with FalconConfig's defaults (multi_query)."""
    from transformers import FalconConfig

    config = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
    }
    hf = FalconConfig.from_dict(config)
    assert hf.multi_query and not hf.new_decoder_architecture
    qkv = hf_qkv_rows(hf)
    assert qkv == {"q": [(0, 32)], "k": [(32, 40)], "v": [(40, 48)]}
    g = torch.Generator().manual_seed(0)
    t = {
        "transformer.h.0.self_attention.query_key_value.weight": torch.randn(48, 32, generator=g),
        "transformer.h.0.self_attention.dense.weight": torch.randn(32, 32, generator=g),
    }
    post = write_checkpoint(tmp_path / "post", config, t)
    desc = json.loads(cli("inspect-layers", post, "--json").out)
    assert desc["adapter"] == "falcon" and desc["layer_prefix"] == "transformer.h."
    assert desc["layers"][0]["tensors"][0]["rows"] == [[0, 40]]


# -- InternLM2: remote code, written by hand ------------------------------------------------------

HID, HEADS, KV = 32, 4, 2
HD, GROUPS = HID // HEADS, HEADS // KV


def internlm2_config(kv: int = KV) -> dict:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2",
        "hidden_size": HID,
        "intermediate_size": 48,
        "num_attention_heads": HEADS,
        "num_key_value_heads": kv,
        "num_hidden_layers": 2,
        "bias": True,
        "vocab_size": 50,
    }


def internlm2_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    t = {"model.tok_embeddings.weight": r(50, HID)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {
            p + "attention_norm.weight": torch.ones(HID),
            p + "attention.wqkv.weight": r((HEADS + 2 * KV) * HD, HID),
            p + "attention.wqkv.bias": r((HEADS + 2 * KV) * HD),
            p + "attention.wo.weight": r(HID, HEADS * HD),
            p + "attention.wo.bias": r(HID),
            p + "ffn_norm.weight": torch.ones(HID),
            p + "feed_forward.w1.weight": r(48, HID),
            p + "feed_forward.w3.weight": r(48, HID),
            p + "feed_forward.w2.weight": r(HID, 48),
        }
    t["model.norm.weight"] = torch.ones(HID)
    t["output.weight"] = r(50, HID)
    return t


def internlm2_split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2Attention.forward: ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + g)``,
    query = ``[..., :g, :]`` flattened over ``(h gs)``, key = ``[..., -2, :]``, value = ``[..., -1, :]``.
    """
    x = qkv.reshape(*qkv.shape[:-1], -1, GROUPS + 2, HD)
    q = x[..., :GROUPS, :].flatten(-3, -2)
    return q, x[..., -2, :], x[..., -1, :]


def internlm2_probs(t: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention probabilities of one layer on hidden states ``x`` (no RoPE)."""
    p = f"model.layers.{layer}.attention.wqkv."
    q, k, _ = internlm2_split(x @ t[p + "weight"].T + t[p + "bias"])  # [T, H, d], [T, KV, d]
    k = k.repeat_interleave(GROUPS, dim=-2)
    logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    mask = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).triu(1)
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


def test_internlm2(tmp_path: Path, cli) -> None:
    pre_t = internlm2_tensors(seed=1)
    post_t = perturbed(pre_t, seed=2, scale=0.05)
    pre = write_checkpoint(tmp_path / "pre", internlm2_config(), pre_t, shards=2)
    post = write_checkpoint(tmp_path / "post", internlm2_config(), post_t, shards=3)

    rows = (HEADS + 2 * KV) * HD
    q, k, v = internlm2_split(torch.arange(rows))
    qkv = {"q": runs(q), "k": runs(k), "v": runs(v)}
    assert qkv["q"] == [(0, 16), (32, 48)] and qkv["k"] == [(16, 24), (48, 56)]
    case = Case("internlm2", {}, "model.layers.", "attention.wqkv", "attention.wo", bias=True)

    # (b) the remote code has no sliding window or other mixer: every layer is global
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    desc = json.loads(res.out)
    assert desc["adapter"] == "internlm2"
    assert desc["global_layers"] == [0, 1] and desc["local_layers"] == []
    for layer in desc["layers"]:
        assert {t["name"]: t["rows"] for t in layer["tensors"]} == {
            f"model.layers.{layer['layer']}.attention.wqkv.{s}": [[0, 24], [32, 56]]
            for s in ("weight", "bias")
        }

    # (a) bytes
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    expected = expected_rows(case, [0, 1], qkv, "qk")
    assert_merged(out, pre, post, expected)
    assert cli("verify", out, "--forward", "always").code == 0

    # (c) transformers cannot load remote code offline: the remote code's own split, done here,
    # gives PRE's queries and keys and POST's values, and the attention of each layer equals that
    # of POST with PRE's Q/K rows put in by hand (and differs from POST's)
    got, _ = load_all(out)
    ref = {n: t.clone() for n, t in post_t.items()}
    for name, spans in expected.items():
        for r0, r1 in spans:
            ref[name][r0:r1] = pre_t[name][r0:r1]
    x = torch.randn(7, HID, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        p = f"model.layers.{i}.attention.wqkv."
        split = {
            m: internlm2_split(x @ t[p + "weight"].T + t[p + "bias"])
            for m, t in (("out", got), ("pre", pre_t), ("post", post_t))
        }
        torch.testing.assert_close(split["out"][0], split["pre"][0], rtol=0, atol=0)
        torch.testing.assert_close(split["out"][1], split["pre"][1], rtol=0, atol=0)
        torch.testing.assert_close(split["out"][2], split["post"][2], rtol=0, atol=0)
        a = internlm2_probs(got, i, x)
        torch.testing.assert_close(a, internlm2_probs(ref, i, x), rtol=0, atol=1e-6)
        assert not torch.allclose(a, internlm2_probs(post_t, i, x), atol=1e-4)

    # --targets q,k,v takes the whole wqkv
    out2 = tmp_path / "out2"
    assert cli("merge", pre, post, "-o", out2, "--targets", "q,k,v", "--quiet").code == 0
    assert_merged(out2, pre, post, expected_rows(case, [0, 1], qkv, "qkv"))


def test_internlm2_rows_must_match_the_config(tmp_path: Path, cli) -> None:
    """A wqkv whose row count disagrees with the config's heads is refused, not guessed."""
    post = write_checkpoint(tmp_path / "post", internlm2_config(kv=1), internlm2_tensors(seed=1))
    res = cli("inspect-layers", post)
    assert res.code == 2
    assert "wqkv.weight" in res.err and "64 rows" in res.err and "48" in res.err
