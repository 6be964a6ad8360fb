"""Per family: tiny random PRE/POST, merge, then check bytes, layer detection and attention.

The attention check loads OUT in transformers and compares, with eager attention and
``output_attentions=True``, against a reference model built from POST with PRE's routing rows put
in by plain state-dict surgery here in the test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import (
    FULL,
    LIN,
    QWEN3_5_TEXT,
    QWEN3_NEXT,
    TINY,
    assert_merged,
    load_all,
    resolve_rows,
    routing_rows,
)


@dataclass
class Family:
    model_type: str
    kwargs: dict
    prefix: str = "model.layers."
    gated: bool = False
    vlm: bool = False
    extra_args: tuple[str, ...] = ()
    expect_global: list[int] = field(default_factory=list)


FAMILIES = {
    "qwen3_next": Family("qwen3_next", QWEN3_NEXT, gated=True, expect_global=[1, 3]),
    "qwen3_5_text": Family("qwen3_5_text", QWEN3_5_TEXT, gated=True, expect_global=[1, 3]),
    "qwen3_5_vlm": Family(
        "qwen3_5",
        {
            "text_config": TINY | QWEN3_5_TEXT,
            "vision_config": {
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 32,
                "patch_size": 2,
                "spatial_merge_size": 1,
                "temporal_patch_size": 1,
            },
        },
        prefix="model.language_model.layers.",
        gated=True,
        vlm=True,
        expect_global=[1, 3],
    ),
    "llama": Family("llama", {"num_hidden_layers": 2}, expect_global=[0, 1]),
    "mistral": Family(
        "mistral", {"num_hidden_layers": 2, "sliding_window": None}, expect_global=[0, 1]
    ),
    "qwen2": Family(
        "qwen2",
        {
            "num_hidden_layers": 3,
            "use_sliding_window": True,
            "max_window_layers": 2,
            "sliding_window": 8,
        },
        expect_global=[0, 1],
    ),
    "qwen3": Family(
        "qwen3", {"num_hidden_layers": 2, "attention_bias": True}, expect_global=[0, 1]
    ),
}


def transformers_global_layers(post: Path, fam: Family) -> list[int]:
    """Which layers transformers itself treats as full attention, from its own config object."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(post).get_text_config()
    types = getattr(cfg, "layer_types", None)
    if types is None:  # llama / mistral: one kind for every layer
        sliding = getattr(cfg, "sliding_window", None)
        return [] if sliding else list(range(cfg.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == FULL]


def attentions(model_dir: Path, fam: Family, state_dict: dict | None = None) -> tuple:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if fam.vlm else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, attn_implementation="eager")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    ids = torch.tensor([[5, 17, 42, 8, 23, 61, 3, 77, 12, 9]])
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    assert out.attentions, "model returned no attention probabilities"
    return tuple(a for a in out.attentions if a is not None)


def surgery_state_dict(pre: Path, post: Path, fam: Family, expected: dict) -> dict:
    """POST's in-memory state dict with PRE's routing rows copied in (the test's own surgery)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if fam.vlm else AutoModelForCausalLM
    post_sd = cls.from_pretrained(post).state_dict()
    pre_sd = cls.from_pretrained(pre).state_dict()
    sd = {k: v.clone() for k, v in post_sd.items()}
    for name, rows in expected.items():
        assert name in sd, f"{name} is not a parameter name of the loaded model"
        for r0, r1 in rows:
            sd[name][r0:r1] = pre_sd[name][r0:r1]
    return sd


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_family(family: str, tmp_path: Path, cli) -> None:
    fam = FAMILIES[family]
    pre, post = build_pair(tmp_path, fam)
    layers = transformers_global_layers(post, fam)
    assert layers == fam.expect_global

    # layer detection agrees with transformers
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    desc = json.loads(res.out)
    assert desc["global_layers"] == layers

    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    post_tensors, _ = load_all(post)
    gated = (TINY["num_attention_heads"], 16) if fam.gated else None
    expected = resolve_rows(
        routing_rows(post_tensors, layers, fam.prefix, gated_heads=gated), post_tensors
    )
    assert any(n.endswith("q_proj.weight") for n in expected)
    assert any(n.endswith("k_proj.weight") for n in expected)
    assert_merged(out, pre, post, expected)

    res = cli("verify", out, "--forward", "always")
    assert res.code == 0, res.err + res.out

    # attention probabilities of OUT = those of POST with PRE's routing put in by hand
    got = attentions(out, fam)
    ref = attentions(post, fam, surgery_state_dict(pre, post, fam, expected))
    plain_post = attentions(post, fam)
    assert len(got) == len(ref) >= len(layers)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got, plain_post)), (
        "restoring Q/K should change the attention pattern"
    )


def build_pair(tmp_path: Path, fam: Family) -> tuple[Path, Path]:
    from conftest import build_hf_pair

    return build_hf_pair(tmp_path, fam.model_type, fam.kwargs, vlm=fam.vlm)


def test_mistral_with_sliding_window_needs_include_sliding(tmp_path: Path, cli) -> None:
    fam = Family("mistral", {"num_hidden_layers": 2, "sliding_window": 8})
    pre, post = build_pair(tmp_path, fam)
    assert transformers_global_layers(post, fam) == []
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2
    assert "--include-sliding" in res.err
    assert not (tmp_path / "out").exists()
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--include-sliding", "--quiet")
    assert res.code == 0, res.err
    post_tensors, _ = load_all(post)
    expected = resolve_rows(routing_rows(post_tensors, [0, 1]), post_tensors)
    assert_merged(tmp_path / "out", pre, post, expected)


def test_qwen2_sliding_layer_only_with_include_sliding(tmp_path: Path, cli) -> None:
    fam = FAMILIES["qwen2"]
    pre, post = build_pair(tmp_path, fam)
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--include-sliding", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["layers"] == [0, 1, 2]
    post_tensors, _ = load_all(post)
    expected = resolve_rows(routing_rows(post_tensors, [0, 1, 2]), post_tensors)
    assert_merged(tmp_path / "out", pre, post, expected)


def test_linear_layers_are_untouched_in_qwen3_next(tmp_path: Path, cli) -> None:
    """The linear-attention layers (0 and 2) keep POST's bytes even for their own projections."""
    pre, post = build_pair(tmp_path, FAMILIES["qwen3_next"])
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    got, _ = load_all(out)
    post_t, _ = load_all(post)
    for n in got:
        if ".layers.0." in n or ".layers.2." in n:
            assert torch.equal(got[n], post_t[n]), n
    assert LIN in json.loads((post / "config.json").read_text())["layer_types"]
