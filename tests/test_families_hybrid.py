"""Hybrid and mixed-attention families: tiny random PRE/POST from transformers, merge, then check.

For each family, one model build serves every check:

* bytes: the routing rows named here (explicitly, per family) are PRE's, everything else POST's;
* layer kinds: ``inspect-layers --json`` agrees with transformers' own config object;
* attention: the probabilities of each restored layer, returned by the model's own attention module
  (eager, ``output_attentions=True``), equal those of POST with PRE's routing tensors put in by plain
  state-dict surgery here, and differ from POST's.

Layer-map fallbacks (legacy spellings, defaults) are checked on config dicts against transformers'
configuration classes, without weights.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_merged, load_all, quiet_transformers

LIN, FULL, SLIDE = "linear_attention", "full_attention", "sliding_attention"
MAMBA = {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 16}
QK = ("q_proj.weight", "k_proj.weight")
QK_BIAS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
QK_NORM = ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight")
IDS = torch.tensor([[5, 17, 42, 8, 23, 61, 3, 77, 12, 9]])


@dataclass(frozen=True)
class Family:
    model_type: str
    kwargs: dict
    global_layers: list[int]  # what the test expects transformers to say
    local_layers: list[int]
    routing: tuple[str, ...]  # the routing tensors of one attention layer, relative to the module
    prefix: str = "model.layers."  # on disk
    module: str = "self_attn"
    loaded_prefix: str | None = None  # in the loaded model's state dict, where v5 renames it
    vlm: bool = False
    merge_args: tuple[str, ...] = ()

    @property
    def restored_layers(self) -> list[int]:
        if "--include-sliding" in self.merge_args:
            return sorted(self.global_layers + self.local_layers)
        return self.global_layers

    def expected(self, layers: list[int]) -> dict[str, list[tuple[int, int]]]:
        """The test's own routing set: whole tensors (rows clipped to the tensor later)."""
        return {
            f"{self.prefix}{i}.{self.module}.{s}": [(0, 10**9)]
            for i in layers
            for s in self.routing
        }


GEMMA3_VISION = {
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 8,
    "patch_size": 4,
}

FAMILIES: dict[str, Family] = {
    "nemotron_h": Family(
        "nemotron_h",
        {
            "hybrid_override_pattern": "M*-*",
            "head_dim": 16,
            "mamba_num_heads": 4,
            "mamba_head_dim": 8,
            "n_groups": 1,
            "ssm_state_size": 8,
            "chunk_size": 16,
        },
        [1, 3],
        [],
        QK,
        prefix="backbone.layers.",
        module="mixer",
        loaded_prefix="model.layers.",
    ),
    "jamba": Family(
        "jamba",
        {
            "num_hidden_layers": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "mamba_d_state": 4,
            "mamba_dt_rank": 4,
        },
        [1, 3],
        [],
        QK,
    ),
    "falcon_h1": Family("falcon_h1", {"num_hidden_layers": 2, **MAMBA}, [0, 1], [], QK),
    "bamba": Family(
        "bamba", {"num_hidden_layers": 4, "attn_layer_indices": [1, 3], **MAMBA}, [1, 3], [], QK
    ),
    "granitemoehybrid": Family(
        "granitemoehybrid",
        {
            "num_hidden_layers": 4,
            "layer_types": ["mamba", "attention"] * 2,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "position_embedding_type": "rope",
            "attention_bias": True,
            **MAMBA,
        },
        [1, 3],
        [],
        QK_BIAS,
    ),
    "lfm2": Family(
        "lfm2",
        {"num_hidden_layers": 4, "full_attn_idxs": [1, 3]},
        [1, 3],
        [],
        ("q_proj.weight", "k_proj.weight", "q_layernorm.weight", "k_layernorm.weight"),
    ),
    "lfm2_moe": Family(
        "lfm2_moe",
        {
            "num_hidden_layers": 4,
            "layer_types": ["conv", FULL, "conv", FULL],
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 12,
            "num_dense_layers": 1,
        },
        [1, 3],
        [],
        ("q_proj.weight", "k_proj.weight", "q_layernorm.weight", "k_layernorm.weight"),
    ),
    "minimax": Family(
        "minimax",
        {
            "num_hidden_layers": 4,
            "layer_types": [LIN, FULL, LIN, FULL],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "head_dim": 16,
            "block_size": 8,
        },
        [1, 3],
        [],
        QK,
    ),
    # default layer_types: full iff i % 4 == 3; q_norm/k_norm span the whole projection
    "olmo_hybrid": Family("olmo_hybrid", {"num_hidden_layers": 4}, [3], [], QK_NORM),
    "gemma3_text": Family(
        "gemma3_text",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": [SLIDE, FULL, SLIDE],
        },
        [1],
        [0, 2],
        QK_NORM,
    ),
    "gemma3_vlm": Family(
        "gemma3",
        {
            "text_config": TINY
            | {
                "num_hidden_layers": 2,
                "head_dim": 16,
                "sliding_window": 8,
                "layer_types": [SLIDE, FULL],
            },
            "vision_config": GEMMA3_VISION,
            "mm_tokens_per_image": 4,
            "image_token_index": 98,
            "boi_token_index": 96,
            "eoi_token_index": 97,
        },
        [1],
        [0],
        QK_NORM,
        prefix="language_model.model.layers.",
        loaded_prefix="model.language_model.layers.",
        vlm=True,
    ),
    # default layer_types: sliding for even i, full for odd i
    "gpt_oss": Family(
        "gpt_oss",
        {
            "num_hidden_layers": 2,
            "head_dim": 16,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "sliding_window": 8,
        },
        [1],
        [0],
        (*QK_BIAS, "sinks"),
    ),
    "recurrent_gemma": Family(
        "recurrent_gemma",
        {"num_hidden_layers": 3, "lru_width": 32, "attention_window_size": 16},
        [],
        [2],
        QK,
        module="temporal_block",
        merge_args=("--include-sliding",),
    ),
}

# -- building, once per family --------------------------------------------------------------------


def model_class(fam: Family):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if fam.vlm else AutoModelForCausalLM


def build(root: Path, fam: Family) -> tuple[Path, Path]:
    """PRE from transformers' classes; POST = PRE + noise, sharded (as ``conftest.build_hf_pair``).

    ``intermediate_size`` is 40 rather than TINY's 37: transformers' grouped-mm MoE path on CPU
    needs 16-byte strides, and the MoE families here would not run otherwise.
    """
    from transformers import AutoConfig

    quiet_transformers()
    torch.manual_seed(0)
    kwargs = fam.kwargs if fam.vlm else TINY | {"intermediate_size": 40} | fam.kwargs
    model = model_class(fam).from_config(AutoConfig.for_model(fam.model_type, **kwargs))
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(post, max_shard_size="40KB")
    return pre, post


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            cache[name] = build(tmp_path_factory.mktemp(name), FAMILIES[name])
        return cache[name]

    return get


# -- transformers' own view -----------------------------------------------------------------------


def transformers_kinds(cfg) -> tuple[list[int], list[int]]:
    """Global and local softmax layers as transformers' config object states them.

    ``layer_types`` is the v5 convention every one of these configs follows (a property or an
    ``attribute_map`` alias where the family saves something else): ``full_attention`` and Falcon-H1's
    ``hybrid`` are global softmax, ``sliding_attention`` local. Family quirks from the modeling code:
    LFM2 builds attention for every type but ``conv``; MiniMax masks its softmax layers with a
    sliding window whenever ``sliding_window`` is set.
    """
    cfg = cfg.get_text_config()
    types = list(cfg.layer_types)
    if cfg.model_type in ("lfm2", "lfm2_moe"):
        glob = [i for i, t in enumerate(types) if t != "conv"]
        return glob, []
    glob = [i for i, t in enumerate(types) if t in (FULL, "hybrid")]
    local = [i for i, t in enumerate(types) if t == SLIDE]
    if cfg.model_type == "minimax" and cfg.sliding_window:
        glob, local = [], glob
    return glob, local


# -- attention probabilities ----------------------------------------------------------------------

ATTN_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mixer|temporal_block)$")


def attention_probs(model_dir: Path, fam: Family, layers: list[int], state_dict=None) -> dict:
    """Each listed layer's attention probabilities, as its own attention module returns them.

    A forward hook keeps the second output of the decoder layer's attention module (eager
    attention returns ``(output, weights)``); the same tensors must also be among
    ``outputs.attentions``, so they are exactly what ``output_attentions=True`` reports.
    """
    model = model_class(fam).from_pretrained(model_dir, attn_implementation="eager")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    got: dict[int, torch.Tensor] = {}

    def keeper(i: int):
        def hook(_module, _args, output) -> None:
            got[i] = output[1]

        return hook

    handles = []
    for name, module in model.named_modules():
        m = ATTN_MODULE.search(name)
        if m and "vision" not in name and int(m.group(1)) in layers:
            handles.append(module.register_forward_hook(keeper(int(m.group(1)))))
    with torch.no_grad():
        out = model(input_ids=IDS, output_attentions=True)
    for h in handles:
        h.remove()
    assert sorted(got) == sorted(layers), f"attention modules found for layers {sorted(got)}"
    recorded = [a for a in (out.attentions or ()) if a is not None]
    for i, a in got.items():
        assert a is not None and a.shape[-1] == IDS.shape[1], f"layer {i}: no attention weights"
        assert any(a is r or torch.equal(a, r) for r in recorded), (
            f"layer {i}: hooked weights are not among outputs.attentions"
        )
    return got


def surgery_state_dict(pre: Path, post: Path, fam: Family, expected: dict) -> dict:
    """POST's loaded state dict with PRE's routing rows copied in by name (the test's own surgery)."""
    cls = model_class(fam)
    pre_sd = cls.from_pretrained(pre).state_dict()
    sd = {k: v.clone() for k, v in cls.from_pretrained(post).state_dict().items()}
    for disk_name, rows in expected.items():
        name = disk_name
        if fam.loaded_prefix:
            assert disk_name.startswith(fam.prefix)
            name = fam.loaded_prefix + disk_name[len(fam.prefix) :]
        assert name in sd, f"{name} is not a parameter of the loaded model"
        for r0, r1 in rows:
            sd[name][r0:r1] = pre_sd[name][r0:r1]
    return sd


# -- the end-to-end check, per family -------------------------------------------------------------


def clip(expected: dict, tensors: dict) -> dict:
    return {n: [(a, min(b, tensors[n].shape[0])) for a, b in r] for n, r in expected.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hybrid_family(family: str, built, tmp_path: Path, cli) -> None:
    from transformers import AutoConfig

    fam = FAMILIES[family]
    pre, post = built(family)
    post_tensors, _ = load_all(post)

    # (b) layer kinds: transformers' config object, the test's expectation and qkrestore agree
    tf_global, tf_local = transformers_kinds(AutoConfig.from_pretrained(post))
    assert (tf_global, tf_local) == (fam.global_layers, fam.local_layers)
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    desc = json.loads(res.out)
    assert (desc["global_layers"], desc["local_layers"]) == (tf_global, tf_local)
    assert desc["layer_prefix"] == fam.prefix
    # inspect-layers lists exactly the routing tensors of every softmax layer, whole rows
    attn_layers = sorted(tf_global + tf_local)
    assert [entry["layer"] for entry in desc["layers"]] == attn_layers
    listed = {t["name"]: t["rows"] for entry in desc["layers"] for t in entry["tensors"]}
    want = clip(fam.expected(attn_layers), post_tensors)
    assert listed == {n: [list(r) for r in rows] for n, rows in want.items()}

    # (a) bytes
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet", *fam.merge_args)
    assert res.code == 0, res.err
    expected = clip(fam.expected(fam.restored_layers), post_tensors)
    assert expected and all(n in post_tensors for n in expected)
    assert_merged(out, pre, post, expected)

    res = cli("verify", out, "--forward", "always", "--json")
    assert res.code == 0, res.err + res.out
    report = json.loads(res.out)
    assert report["ok"] and report["forward"]["ran"] and report["forward"]["ok"], report

    # (c) attention probabilities of the restored layers
    layers = fam.restored_layers
    got = attention_probs(out, fam, layers)
    ref = attention_probs(post, fam, layers, surgery_state_dict(pre, post, fam, expected))
    plain = attention_probs(post, fam, layers)
    for i in layers:
        torch.testing.assert_close(got[i], ref[i], rtol=0, atol=1e-6)
        assert not torch.allclose(got[i], plain[i], atol=1e-4), (
            f"layer {i}: restoring Q/K should change the attention pattern"
        )


# -- family-specific behaviour --------------------------------------------------------------------


def test_recurrent_gemma_needs_include_sliding(built, tmp_path: Path, cli) -> None:
    pre, post = built("recurrent_gemma")
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2
    assert "--include-sliding" in res.err
    assert not (tmp_path / "out").exists()


def test_gpt_oss_sinks_follow_q(built, tmp_path: Path, cli) -> None:
    """``--targets k`` leaves the sinks POST's; ``--targets q`` restores them with W_Q and b_Q."""
    fam = FAMILIES["gpt_oss"]
    pre, post = built("gpt_oss")
    post_tensors, _ = load_all(post)
    base = "model.layers.1.self_attn."
    for target, names in (
        ("k", ("k_proj.weight", "k_proj.bias")),
        ("q", ("q_proj.weight", "q_proj.bias", "sinks")),
    ):
        out = tmp_path / f"out-{target}"
        res = cli("merge", pre, post, "-o", out, "--quiet", "--targets", target)
        assert res.code == 0, res.err
        assert_merged(out, pre, post, clip({base + n: [(0, 10**9)] for n in names}, post_tensors))
    assert fam.global_layers == [1]


def test_minimax_lightning_layer_is_refused_when_the_config_says_softmax(
    built, tmp_path: Path, cli
) -> None:
    """Tensor names never pick layers: a config that calls a lightning layer softmax is an error."""
    pre, post = built("minimax")
    copies = []
    for src in (pre, post):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["layer_types"] = [FULL, FULL, LIN, FULL]
        (dst / "config.json").write_text(json.dumps(cfg))
        copies.append(dst)
    res = cli("merge", *copies, "-o", tmp_path / "out")
    assert res.code != 0
    assert "qkv_proj" in res.err
    assert not (tmp_path / "out").exists()


def test_nemotron_h_remote_code_config_on_disk(built, tmp_path: Path, cli) -> None:
    """A pre-v5 config.json (``hybrid_override_pattern`` + ``num_hidden_layers``) maps the same."""
    from transformers import AutoConfig

    _, post = built("nemotron_h")
    legacy = tmp_path / "legacy"
    shutil.copytree(post, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    assert cfg.pop("layers_block_type") == [LIN, FULL, "mlp", FULL]
    cfg |= {"hybrid_override_pattern": "M*-*", "num_hidden_layers": 4}
    (legacy / "config.json").write_text(json.dumps(cfg))
    assert transformers_kinds(AutoConfig.from_pretrained(legacy)) == ([1, 3], [])
    res = cli("inspect-layers", legacy, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["global_layers"] == [1, 3]


# -- layer maps from config alone, against transformers' configuration classes --------------------

N = 8
CONFIG_CASES: list[tuple[str, dict, tuple[list[int], list[int]] | None]] = [
    # (model_type, config fields, expectation when transformers 5.24 cannot state it)
    ("nemotron_h", {"hybrid_override_pattern": "M-*-E*", "num_hidden_layers": 6}, None),
    ("nemotron_h", {"layers_block_type": ["mamba", "mlp", "attention", "moe"]}, None),
    ("nemotron_h", {"layers_block_type": [LIN, "mlp", FULL, "moe", FULL]}, None),
    ("jamba", {"num_hidden_layers": 16}, None),
    ("jamba", {"num_hidden_layers": N, "attn_layer_period": 3, "attn_layer_offset": 2}, None),
    ("falcon_h1", {"num_hidden_layers": 3}, None),
    ("bamba", {"num_hidden_layers": N, "attn_layer_indices": [0, 5]}, None),
    ("bamba", {"num_hidden_layers": 4}, None),
    ("granitemoehybrid", {"num_hidden_layers": 4, "layer_types": ["mamba", "attention"] * 2}, None),
    ("granitemoehybrid", {"num_hidden_layers": 3, "layer_types": [FULL, LIN, FULL]}, None),
    ("granitemoehybrid", {"num_hidden_layers": 3}, None),
    ("lfm2", {"num_hidden_layers": N, "full_attn_idxs": [2, 5]}, None),
    ("lfm2", {"num_hidden_layers": 3}, None),
    ("lfm2", {"num_hidden_layers": 3, "layer_types": ["conv", FULL, "conv"]}, None),
    ("lfm2_moe", {"num_hidden_layers": 3, "layer_types": [FULL, "conv", FULL]}, None),
    ("minimax", {"num_hidden_layers": 4, "layer_types": [LIN, FULL, LIN, FULL]}, None),
    ("minimax", {"num_hidden_layers": 5}, None),
    ("minimax", {"num_hidden_layers": 2, "layer_types": [LIN, FULL], "sliding_window": 8}, None),
    # the remote-code spelling, which transformers 5.24 ignores: MiniMax-Text-01's [0]*7 + [1]
    ("minimax", {"num_hidden_layers": 16, "attn_type_list": ([0] * 7 + [1]) * 2}, ([7, 15], [])),
    ("olmo_hybrid", {"num_hidden_layers": N}, None),
    ("olmo_hybrid", {"num_hidden_layers": 3}, None),
    ("olmo_hybrid", {"num_hidden_layers": 3, "layer_types": [FULL, LIN, FULL]}, None),
    ("gemma3_text", {"num_hidden_layers": 12}, None),
    ("gemma3_text", {"num_hidden_layers": 5}, None),
    ("gemma3_text", {"num_hidden_layers": 4, "sliding_window_pattern": 2}, None),
    ("gemma3_text", {"num_hidden_layers": 3, "layer_types": [FULL, SLIDE, FULL]}, None),
    ("gemma3", {"text_config": {"num_hidden_layers": 6, "sliding_window_pattern": 3}}, None),
    ("gpt_oss", {"num_hidden_layers": 4}, None),
    ("gpt_oss", {"num_hidden_layers": 3, "layer_types": [FULL, FULL, SLIDE]}, None),
    ("recurrent_gemma", {"num_hidden_layers": 7}, None),
    ("recurrent_gemma", {"num_hidden_layers": 5, "block_types": ["recurrent", "attention"]}, None),
]


@pytest.mark.parametrize(("model_type", "fields", "stated"), CONFIG_CASES)
def test_layer_map_from_config(model_type: str, fields: dict, stated) -> None:
    from transformers import AutoConfig

    from qkrestore.families import Kind, resolve

    config = {"model_type": model_type, **fields}
    if stated is None:
        quiet_transformers()
        stated = transformers_kinds(AutoConfig.for_model(model_type, **fields))
    kinds = resolve(config).family.layer_kinds(config)
    got = (
        [i for i, k in enumerate(kinds) if k is Kind.GLOBAL],
        [i for i, k in enumerate(kinds) if k is Kind.LOCAL],
    )
    assert got == stated


def test_nemotron_h_pattern_with_unknown_character_is_refused() -> None:
    from qkrestore.errors import ConfigError
    from qkrestore.families import resolve

    config = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*X"}
    with pytest.raises(ConfigError, match="hybrid_override_pattern"):
        resolve(config).family.layer_kinds(config)
