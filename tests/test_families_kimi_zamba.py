"""Kimi Linear (MLA) and Zamba2 (tied shared blocks): bytes, layer detection and attention.

The expected routing rows are written out here from transformers' own modeling code, not from
qkrestore's adapters:

* Kimi Linear (``KimiLinearAttention``): ``q_proj`` whole (or ``q_a_proj``/``q_a_layernorm``/
  ``q_b_proj``); ``kv_a_proj_with_mqa`` rows ``[r, r + rope)`` (k_rot); ``kv_b_proj`` rows
  ``[h(nope+v), h(nope+v) + nope)`` per head (K_nope). The latent rows ``[0, r)`` and
  ``kv_a_layernorm`` only with ``--mla-latent pre``.
* Zamba2 (``Zamba2Model.get_layers``, ``Zamba2Attention``): hybrid ordinal ``n`` runs block
  ``n % num_mem_blocks`` with adapter ``n``; in a tied save the block lives under the block's first
  hybrid layer.

The attention check loads OUT with eager attention and ``output_attentions=True`` (both models
record their softmax attention modules, ``_can_record_outputs["attentions"]``) and compares with
POST loaded in transformers whose parameters get PRE's routing rows copied in here, in place:
tied parameters are one tensor in memory, so copying into the owner's name reaches every user.
v5 renames no tensor of these attention blocks on load (``conversion_mapping.py`` only renames
Kimi's KDA conv/forget-gate and MoE tensors), which the test asserts by looking every name up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_merged, load_all, quiet_transformers, write_checkpoint

from qkrestore.errors import ConfigError
from qkrestore.families import resolve
from qkrestore.io.checkpoint import Checkpoint
from qkrestore.surgery.plan import PlanOptions, build_plan

KIMI = {
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "kv_lora_rank": 8,
    "q_lora_rank": None,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "linear_attn_config": {
        "full_attn_layers": [2, 4],
        "kda_layers": [1, 3],
        "num_heads": 2,
        "head_dim": 8,
        "short_conv_kernel_size": 4,
    },
    "num_experts": 4,
    "num_experts_per_token": 2,
    "moe_intermediate_size": 12,
}
KIMI_QLORA = KIMI | {"q_lora_rank": 6, "attention_bias": True}
ZAMBA2 = {
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,  # the adapters add 2·hidden outputs to k_proj's: needs KV == H
    "layers_block_type": ["mamba", "hybrid"] * 3,
    "num_mem_blocks": 2,
    "use_shared_attention_adapter": True,
    "adapter_rank": 4,
    "mamba_d_state": 8,
    "n_mamba_heads": 4,
    "use_mem_rope": True,
}
ZAMBA2_UNTIED = ZAMBA2 | {"tie_word_embeddings": False}
IDS = torch.tensor([[5, 17, 42, 8, 23, 61, 3, 77, 12, 9, 31, 4]])
ATTN = "shared_transformer.self_attn"


# -- building ---------------------------------------------------------------------------------


def build(root: Path, model_type: str, kwargs: dict) -> tuple[Path, Path]:
    """Like ``conftest.build_hf_pair``, but the family's kwargs may override TINY's.

    Both families need ``num_key_value_heads == num_attention_heads`` to run a forward pass (TINY
    has 1): Kimi's ``kv_b_proj`` already expands keys to every head and ``eager_attention_forward``
    would repeat them again; Zamba2's k adapter outputs ``2·hidden`` features, added to ``k_proj``'s.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(TINY | kwargs)))
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(post, max_shard_size="40KB")
    return pre, post


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("kimi_zamba")
    out = {}
    for name, model_type, kwargs in (
        ("kimi", "kimi_linear", KIMI),
        ("kimi_qlora", "kimi_linear", KIMI_QLORA),
        ("zamba2", "zamba2", ZAMBA2),
        ("zamba2_untied", "zamba2", ZAMBA2_UNTIED),
    ):
        (root / name).mkdir()
        out[name] = build(root / name, model_type, kwargs)
    out["zamba2_copies"] = with_block_copies(root / "zamba2_copies", *out["zamba2"])
    return out


def hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def with_block_copies(root: Path, pre: Path, post: Path) -> tuple[Path, Path]:
    """A tied Zamba2 save that stores a copy of its shared block under *every* hybrid layer."""
    cfg = hf_config(post)
    hybrid = [i for i, t in enumerate(cfg.layers_block_type) if t == "hybrid"]
    m = cfg.num_mem_blocks
    out = []
    for side in (pre, post):
        tensors, _ = load_all(side)
        for n, layer in enumerate(hybrid):
            owner = hybrid[n % m]
            if owner == layer:
                continue
            src = f"model.layers.{owner}.shared_transformer."
            for name in [k for k in tensors if k.startswith(src)]:
                copy = f"model.layers.{layer}.shared_transformer." + name[len(src) :]
                tensors[copy] = tensors[name].clone()
        config = json.loads((side / "config.json").read_text())
        out.append(write_checkpoint(root / side.name, config, tensors, shards=3))
    return out[0], out[1]


# -- the test's own reading of each layout ------------------------------------------------------


def kimi_mla_layers(cfg) -> list[int]:
    return [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]


def kimi_expected(cfg, latent: bool = False, targets: str = "qk") -> dict[str, list]:
    """KimiLinearAttention: q = q_proj(x) viewed [H, nope+rope]; kv_a = [latent r | k_rot rope];
    kv_b viewed [H, nope+v, r] with K_nope the first ``nope`` rows of each head."""
    heads, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    v, r, bias = cfg.v_head_dim, cfg.kv_lora_rank, cfg.attention_bias
    out: dict[str, list] = {}
    for i in kimi_mla_layers(cfg):
        a = f"model.layers.{i}.self_attn."
        if "q" in targets:
            if cfg.q_lora_rank is None:
                out[a + "q_proj.weight"] = [(0, heads * (nope + rope))]
            else:
                out[a + "q_a_proj.weight"] = [(0, cfg.q_lora_rank)]
                out[a + "q_a_layernorm.weight"] = [(0, cfg.q_lora_rank)]
                out[a + "q_b_proj.weight"] = [(0, heads * (nope + rope))]
                if bias:
                    out[a + "q_a_proj.bias"] = [(0, cfg.q_lora_rank)]
        kv_a = [(0 if latent else r, r + rope)]
        out[a + "kv_a_proj_with_mqa.weight"] = kv_a
        if bias:
            out[a + "kv_a_proj_with_mqa.bias"] = kv_a
        if latent:
            out[a + "kv_a_layernorm.weight"] = [(0, r)]
        per_head = nope + v
        kv_b = [(h * per_head, h * per_head + nope) for h in range(heads)]
        if "v" in targets:
            kv_b += [(h * per_head + nope, (h + 1) * per_head) for h in range(heads)]
        out[a + "kv_b_proj.weight"] = sorted(kv_b)
        if "o" in targets:
            out[a + "o_proj.weight"] = [(0, cfg.hidden_size)]
            if bias:
                out[a + "o_proj.bias"] = [(0, cfg.hidden_size)]
    return out


def zamba2_hybrid(cfg) -> list[int]:
    return [i for i, t in enumerate(cfg.layers_block_type) if t == "hybrid"]


def zamba2_expected(
    cfg, tensors: dict, layers: list[int] | None = None, projs: str = "qk"
) -> dict[str, list]:
    """Zamba2Model.get_layers: hybrid ordinal n runs block n % M and adapter n of that block.

    Tied: the block and its adapters are stored under the block's first hybrid layer (and, in a
    save with copies, under every layer of the block too: all stored copies are restored). The
    block's projections go with its owner, adapter n with hybrid layer n. Untied: layer n's own
    projections and its adapter n; the other adapter slots of its block are never run.
    """
    hybrid = zamba2_hybrid(cfg)
    m = cfg.num_mem_blocks
    layers = hybrid if layers is None else layers
    out: dict[str, list] = {}

    def take(layer: int, suffix: str) -> None:
        name = f"model.layers.{layer}.{ATTN}.{suffix}"
        if name in tensors:
            out[name] = [(0, tensors[name].shape[0])]

    for layer in layers:
        n = hybrid.index(layer)
        holders = hybrid[n % m :: m] if cfg.tie_word_embeddings else [layer]
        for x in holders:
            for p in projs:
                if n < m or not cfg.tie_word_embeddings:
                    take(x, f"{p}_proj.weight")
                if p in "qkv":
                    for part in (0, 1):
                        take(x, f"linear_{p}_adapter_list.{n}.{part}.weight")
    return out


# -- attention ----------------------------------------------------------------------------------


def load(path: Path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def attentions(model) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=IDS, output_attentions=True)
    assert out.attentions, "the model returned no attention probabilities"
    return [a for a in out.attentions if a is not None]


def surgery(pre: Path, post: Path, expected: dict) -> object:
    """POST in transformers, with PRE's routing rows copied into its parameters by name."""
    ref, src = load(post), load(pre)
    params = dict(ref.named_parameters(remove_duplicate=False))
    pre_params = dict(src.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, rows in expected.items():
            assert name in params and name in pre_params, f"{name} is not a loaded parameter"
            for r0, r1 in rows:
                params[name][r0:r1] = pre_params[name][r0:r1]
    return ref


def check_attention(out: Path, pre: Path, post: Path, expected: dict, n_layers: int) -> None:
    got = attentions(load(out))
    ref = attentions(surgery(pre, post, expected))
    plain = attentions(load(post))
    assert len(got) == len(ref) == len(plain) == n_layers
    for a, b, c in zip(got, ref, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-5), "restoring Q/K should change the pattern"


def merge(cli, pre: Path, post: Path, out: Path, *extra: str) -> None:
    res = cli("merge", pre, post, "-o", out, "--quiet", *extra)
    assert res.code == 0, res.err
    res = cli("verify", out, "--forward", "always")
    assert res.code == 0, res.err + res.out


def global_layers(cli, post: Path) -> list[int]:
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)["global_layers"]


def plan_names(pre: Path, post: Path, **kw) -> list[str]:
    with Checkpoint.open(pre) as a, Checkpoint.open(post) as b:
        return [p.name for p in build_plan(a, b, PlanOptions(**kw)).patches]


# -- Kimi Linear --------------------------------------------------------------------------------


def test_kimi_mla_layers_and_rows(pairs, tmp_path: Path, cli) -> None:
    pre, post = pairs["kimi"]
    cfg = hf_config(post)
    assert kimi_mla_layers(cfg) == [1, 3]  # full_attn_layers [2, 4] are 1-based
    assert global_layers(cli, post) == kimi_mla_layers(cfg)

    out = tmp_path / "out"
    merge(cli, pre, post, out)
    expected = kimi_expected(cfg)
    # the layout written out for the tiny model: H=2, nope=8, rope=4, v=8, r=8
    assert expected["model.layers.1.self_attn.kv_b_proj.weight"] == [(0, 8), (16, 24)]
    assert expected["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == [(8, 12)]
    assert expected["model.layers.1.self_attn.q_proj.weight"] == [(0, 24)]
    assert_merged(out, pre, post, expected)
    # KDA layers 0 and 2 have q_proj/k_proj too; nothing of theirs is touched
    post_t, _ = load_all(post)
    assert "model.layers.0.self_attn.k_proj.weight" in post_t
    assert not any(n.startswith(("model.layers.0.", "model.layers.2.")) for n in expected)
    check_attention(out, pre, post, expected, n_layers=2)


def test_kimi_latent_option_and_q_lora(pairs, tmp_path: Path, cli) -> None:
    pre, post = pairs["kimi_qlora"]
    cfg = hf_config(post)
    assert cfg.q_lora_rank == 6 and cfg.attention_bias
    out = tmp_path / "out"
    merge(cli, pre, post, out, "--mla-latent", "pre")
    expected = kimi_expected(cfg, latent=True)
    assert expected["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] == [(0, 12)]
    assert "model.layers.3.self_attn.kv_a_layernorm.weight" in expected
    assert_merged(out, pre, post, expected)
    check_attention(out, pre, post, expected, n_layers=2)

    # without the option the latent rows and kv_a_layernorm stay POST's
    out2 = tmp_path / "out2"
    merge(cli, pre, post, out2)
    assert_merged(out2, pre, post, kimi_expected(cfg))
    # the option also works from Python, and 'post' means the default
    names = plan_names(pre, post, adapter_options={"mla_latent": "pre"})
    assert "model.layers.1.self_attn.kv_a_layernorm.weight" in names
    assert "model.layers.1.self_attn.kv_a_layernorm.weight" not in plan_names(
        pre, post, adapter_options={"mla_latent": "post"}
    )


def test_kimi_v_and_o_targets(pairs, tmp_path: Path, cli) -> None:
    pre, post = pairs["kimi_qlora"]
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet", "--targets", "q,k,v,o")
    assert res.code == 0, res.err
    assert_merged(out, pre, post, kimi_expected(hf_config(post), targets="qkvo"))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_hidden_layers": 9},
        {"layer_types": ["full_attention", "linear_attention", "full_attention"]},
        {"linear_attn_config": {"full_attn_layers": [3], "kda_layers": [1, 2, 4, 5]}},
    ],
)
def test_kimi_layer_map_matches_transformers(extra: dict) -> None:
    from transformers import KimiLinearConfig

    raw = {"model_type": "kimi_linear", "num_hidden_layers": 5} | extra
    if "layer_types" in extra:
        raw["num_hidden_layers"] = len(extra["layer_types"])
    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    want = [
        i for i, t in enumerate(KimiLinearConfig(**kwargs).layer_types) if t == "full_attention"
    ]
    adapter = resolve(raw).family
    assert adapter.name == "kimi_linear"
    kinds = adapter.layer_kinds(raw)
    assert [i for i, k in enumerate(kinds) if k.value == "global"] == want


def test_kimi_ambiguous_layer_lists_are_refused() -> None:
    raw = {
        "model_type": "kimi_linear",
        "num_hidden_layers": 4,
        "linear_attn_config": {"kda_layers": [1, 2, 3]},
    }
    with pytest.raises(ConfigError):
        resolve(raw).family.layer_kinds(raw)


# -- Zamba2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", ["zamba2", "zamba2_untied", "zamba2_copies"])
def test_zamba2_saves(save: str, pairs, tmp_path: Path, cli) -> None:
    pre, post = pairs[save]
    cfg = hf_config(post)
    assert zamba2_hybrid(cfg) == cfg.hybrid_layer_ids == [1, 3, 5]
    assert global_layers(cli, post) == zamba2_hybrid(cfg)

    out = tmp_path / "out"
    merge(cli, pre, post, out)
    post_t, _ = load_all(post)
    expected = zamba2_expected(cfg, post_t)
    a = f"model.layers.1.{ATTN}."
    if save == "zamba2":  # the v5 tied layout, written out: L5 holds nothing of its own
        b1, b3 = a, f"model.layers.3.{ATTN}."
        want = [b + f"{p}_proj.weight" for b in (b1, b3) for p in "qk"]
        want += [  # (holder, adapter index): L1 holds block 0 with adapters 0 and 2, L3 block 1
            f"{b}linear_{p}_adapter_list.{n}.{j}.weight"
            for b, n in ((b1, 0), (b1, 2), (b3, 1))
            for p in "qk"
            for j in (0, 1)
        ]
        assert sorted(expected) == sorted(want)
    if save == "zamba2_untied":  # layer 5's own block; its never-run adapter slot 0 stays POST's
        assert f"model.layers.5.{ATTN}.linear_q_adapter_list.2.0.weight" in expected
        assert f"model.layers.5.{ATTN}.linear_q_adapter_list.0.0.weight" not in expected
        assert f"{a}linear_q_adapter_list.2.0.weight" not in expected
    if save == "zamba2_copies":  # every stored copy follows, so copies stay equal (and tied)
        assert f"model.layers.5.{ATTN}.q_proj.weight" in expected
        assert f"model.layers.5.{ATTN}.linear_k_adapter_list.0.1.weight" in expected
    assert_merged(out, pre, post, expected)
    names = plan_names(pre, post)
    assert len(names) == len(set(names)) == len(expected), "a tensor is planned twice"

    model = load(out)
    shared = [model.model.layers[i].shared_transformer.self_attn.q_proj.weight for i in (1, 5)]
    tied = shared[0].data_ptr() == shared[1].data_ptr()
    assert tied == (save != "zamba2_untied")
    check_attention(out, pre, post, expected, n_layers=3)


@pytest.mark.parametrize(
    ("save", "layers"), [("zamba2", [5]), ("zamba2", [1]), ("zamba2_copies", [3, 5])]
)
def test_zamba2_layer_subsets(save: str, layers: list[int], pairs, tmp_path: Path, cli) -> None:
    """A non-owner restores only its adapter; an owner restores the block (for all its users)."""
    pre, post = pairs[save]
    out = tmp_path / "out"
    sel = ",".join(map(str, layers))
    res = cli("merge", pre, post, "-o", out, "--quiet", "--layers", sel)
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    expected = zamba2_expected(hf_config(post), post_t, layers)
    if layers == [5]:
        assert not any(n.endswith("_proj.weight") for n in expected)
    assert_merged(out, pre, post, expected)


def test_zamba2_v_and_o_targets(pairs, tmp_path: Path, cli) -> None:
    pre, post = pairs["zamba2"]
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet", "--targets", "q,k,v,o")
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    assert_merged(out, pre, post, zamba2_expected(hf_config(post), post_t, projs="qkvo"))


@pytest.mark.parametrize(
    "raw",
    [
        {"num_hidden_layers": 54},
        {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},
    ],
)
def test_zamba2_layer_map_matches_transformers(raw: dict) -> None:
    from transformers import Zamba2Config

    want = Zamba2Config(**raw).hybrid_layer_ids
    cfg = {"model_type": "zamba2"} | raw
    kinds = resolve(cfg).family.layer_kinds(cfg)
    assert [i for i, k in enumerate(kinds) if k.value == "global"] == want


def test_zamba2_copies_fixture_loads_tied(pairs) -> None:
    """The hand-made copies save really loads as a tied model (both copies present and equal)."""
    _, post = pairs["zamba2_copies"]
    model = load(post)
    a = model.model.layers[1].shared_transformer.self_attn.k_proj.weight
    b = model.model.layers[5].shared_transformer.self_attn.k_proj.weight
    assert a.data_ptr() == b.data_ptr()
