"""PEFT adapters as POST: adapter out, model out, across families, checked against peft itself.

Each case builds PRE with transformers' own classes and an adapter with peft (B set to random
values). The reference is peft's ``merge_and_unload`` of PRE + the original adapter, with PRE's
routing rows put back by state-dict surgery; the routing rows are the test's own reading of each
family (plain/gated q_proj, Phi-3's fused [Q|K|V], Kimi's MLA rows from the Kimi tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, TINY, load_all
from lora_fixtures import (
    DENSE,
    assert_state,
    base_state,
    build_adapter,
    build_base,
    gated_q_rows,
    merged_state,
    missing_key_warnings,
    with_pre_rows,
)
from test_families_kimi_zamba import KIMI, kimi_expected

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def dense_rows(layers: list[int], prefix: str = "model.layers.") -> dict[str, list]:
    out: dict[str, list] = {}
    for i in layers:
        for t in ("q", "k"):
            out[f"{prefix}{i}.self_attn.{t}_proj.weight"] = [(0, 10**9)]
            out[f"{prefix}{i}.self_attn.{t}_norm.weight"] = [(0, 10**9)]
    return out


def qwen3_next_rows(cfg: dict) -> dict[str, list]:
    out: dict[str, list] = {}
    heads, hd = 2, cfg["head_dim"]
    for i, kind in enumerate(cfg["layer_types"]):
        if kind != "full_attention":
            continue
        a = f"model.layers.{i}.self_attn."
        out[a + "q_proj.weight"] = gated_q_rows(heads, hd)
        out[a + "k_proj.weight"] = [(0, 10**9)]
        out[a + "q_norm.weight"] = [(0, 10**9)]
        out[a + "k_norm.weight"] = [(0, 10**9)]
    return out


def phi3_rows(layers: int, heads: int, kv: int, hd: int) -> dict[str, list]:
    # Phi3Attention.forward: qkv[..., :H·hd] is Q, the next kv·hd rows K, the rest V.
    q_end = heads * hd
    return {
        f"model.layers.{i}.self_attn.qkv_proj.weight": [(0, q_end + kv * hd)] for i in range(layers)
    }


def kimi_rows() -> dict[str, list]:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("kimi_linear", **(TINY | KIMI))
    return kimi_expected(cfg)


CASES = {
    "qwen3": ("qwen3", DENSE, {"target_modules": QKVO}, dense_rows([0, 1])),
    "qwen3_next": ("qwen3_next", QWEN3_NEXT, {"target_modules": QKVO}, qwen3_next_rows(QWEN3_NEXT)),
    "qwen3_next_dora": (
        "qwen3_next",
        QWEN3_NEXT,
        {"target_modules": QKVO, "use_dora": True},
        qwen3_next_rows(QWEN3_NEXT),
    ),
    "phi3": (
        "phi3",
        {"num_hidden_layers": 2, "num_key_value_heads": 2},
        {"target_modules": ["qkv_proj", "o_proj"]},
        phi3_rows(2, 2, 2, 16),
    ),
    "kimi_linear": (
        "kimi_linear",
        KIMI,
        {"target_modules": ["q_proj", "k_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]},
        None,  # filled lazily: needs the transformers config
    ),
    "rslora_rank_pattern": (
        "qwen3",
        DENSE,
        {
            "target_modules": QKVO,
            "use_rslora": True,
            "rank_pattern": {"k_proj": 2, "layers.1.self_attn.v_proj": 6},
            "alpha_pattern": {"o_proj": 3},
        },
        dense_rows([0, 1]),
    ),
    "embedding": (
        "qwen3",
        DENSE,
        {"target_modules": [*QKVO, "embed_tokens", "gate_proj"], "layers_to_transform": None},
        dense_rows([0, 1]),
    ),
    "modules_to_save": (
        "qwen3",
        DENSE,
        {"target_modules": QKVO, "modules_to_save": ["q_norm", "lm_head"]},
        dense_rows([0, 1]),
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict]]:
    out = {}
    for name, (model_type, kwargs, lora, rows) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        pre = build_base(root, model_type, kwargs)
        adapter = build_adapter(pre, root / "adapter", r=4, lora_alpha=8, **lora)
        out[name] = (pre, adapter, rows if rows is not None else kimi_rows())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_out_matches_reference(name: str, built, tmp_path: Path, cli) -> None:
    pre, adapter, rows = built[name]
    out = tmp_path / "out"
    r = cli("merge", pre, adapter, "-o", out, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["output_kind"] == "adapter"

    pre_state = base_state(pre)
    ref, _ = merged_state(pre, adapter)
    want = with_pre_rows(ref, pre_state, rows)
    got, warns = merged_state(pre, out)
    assert not missing_key_warnings(warns), warns
    dora = "dora" in name
    assert_state(got, want, pre_state, rows, exact_rows=not dora)

    # The card and config say what peft and the Hub need.
    card = (out / "README.md").read_text()
    # A local PRE has no Hub id: base_model is left out, and no local path reaches the card.
    assert "library_name: peft" in card and "base_model" not in card.split("---")[1]
    assert str(pre) not in card
    cfg = json.loads((out / "adapter_config.json").read_text())
    orig = json.loads((adapter / "adapter_config.json").read_text())
    # Issue 22 class 6: the local path peft recorded as the base is not carried into OUT.
    own = ("exclude_modules", "base_model_name_or_path")
    assert {k: v for k, v in cfg.items() if k not in own} == {
        k: v for k, v in orig.items() if k not in own
    }
    assert orig["base_model_name_or_path"] == str(pre) and cfg["base_model_name_or_path"] is None


@pytest.mark.parametrize("name", list(CASES))
def test_model_out_matches_reference(name: str, built, tmp_path: Path, cli) -> None:
    pre, adapter, rows = built[name]
    out = tmp_path / "model"
    r = cli("merge", pre, adapter, "-o", out, "--merge-adapter")
    assert r.code == 0, r.err
    pre_state = base_state(pre)
    ref, _ = merged_state(pre, adapter)
    want = with_pre_rows(ref, pre_state, rows)
    got, metas = load_all(out)
    pre_files, pre_metas = load_all(pre)
    assert metas == pre_metas and set(got) == set(pre_files)
    # Tensors transformers renames on load (v5 fuses MoE experts) are not LoRA targets here: they
    # must be PRE's bytes; all others are compared with the reference state dict.
    renamed = [k for k in got if k not in want]
    for k in renamed:
        assert torch.equal(got[k], pre_files[k]), k
    common = [k for k in got if k in want]
    # Routing rows are PRE's bytes exactly, even for DoRA (the model writer copies them).
    assert_state(
        {k: got[k] for k in common}, {k: want[k] for k in common}, pre_state, rows, exact_rows=True
    )
    # PRE's layout: same files, same header bytes.
    for f in pre.glob("*.safetensors"):
        head = f.read_bytes()[:8]
        n = int.from_bytes(head, "little")
        assert (out / f.name).read_bytes()[: 8 + n] == f.read_bytes()[: 8 + n]
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (pre / "config.json").read_text()
    )
