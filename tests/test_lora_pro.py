"""QK-Pro on an adapter: low-rank result equal to ``pro`` on PRE and the fully merged POST.

The comparison is with the tool's full-checkpoint ``pro`` (itself tested against the closed form in
test_pro_math/test_pro_cli), run on PRE and POST = PRE + adapter merged by peft and saved with
transformers. The adapter path never builds POST: it solves on lora_B only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, load_all
from lora_fixtures import DENSE, build_adapter, build_base, load_base, merged_state

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "qwen3": ("qwen3", DENSE, {}),
    "qwen3_next": ("qwen3_next", QWEN3_NEXT, {}),
    "qwen3_rslora": ("qwen3", DENSE, {"use_rslora": True, "rank_pattern": {"q_proj": 6}}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    from peft import PeftModel

    out = {}
    for name, (model_type, kwargs, lora) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        pre = build_base(root, model_type, kwargs)
        adapter = build_adapter(
            pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO, scale=0.2, **lora
        )
        merged = PeftModel.from_pretrained(load_base(pre), adapter).merge_and_unload()
        merged.save_pretrained(root / "post")
        out[name] = (pre, adapter, root / "post")
    return out


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("name", "fix"),
    [("qwen3", "key"), ("qwen3", "query"), ("qwen3_next", "key"), ("qwen3_rslora", "query")],
)
def test_pro_on_adapter_equals_pro_on_merged_post(
    name: str, fix: str, built, tmp_path, cli
) -> None:
    pre, adapter, post = built[name]
    common = ("--fix", fix, "--ridge", "0.5", "--device", "cpu")
    full = tmp_path / "full"
    assert cli("pro", pre, post, "-o", full, *common).code == 0
    want, _ = load_all(full)

    out = tmp_path / "adapter-out"
    r = cli("pro", pre, adapter, "-o", out, *common, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["written"]["solve"]["systems"] > 0
    got, warns = merged_state(pre, out)
    assert not [w for w in warns if "missing" in w.lower()], warns
    _close({k: got[k] for k in want if k in got}, {k: want[k] for k in want if k in got})

    # Low-rank: every lora_A and every rank is the input's; the free side's B changed.
    a_in, _ = load_all(adapter)
    a_out, _ = load_all(out)
    free = "q_proj" if fix == "key" else "k_proj"
    for k, t in a_out.items():
        assert t.shape == a_in[k].shape, k
        if "lora_A" in k:
            assert torch.equal(t, a_in[k]), k
    assert any(free in k and "lora_B" in k and not torch.equal(a_out[k], a_in[k]) for k in a_out)

    model = tmp_path / "model-out"
    assert cli("pro", pre, adapter, "-o", model, *common, "--merge-adapter").code == 0
    got_model, _ = load_all(model)
    _close(got_model, want)
    for folder in (out, model):
        r = cli("verify", folder)
        assert r.code == 0, r.err


def test_pro_ridge_zero_is_restore(built, tmp_path: Path, cli) -> None:
    pre, adapter, _ = built["qwen3_next"]
    a, b = tmp_path / "pro", tmp_path / "restore"
    assert cli("pro", pre, adapter, "-o", a, "--ridge", "0", "--device", "cpu").code == 0
    assert cli("merge", pre, adapter, "-o", b).code == 0
    ta, _ = load_all(a)
    tb, _ = load_all(b)
    assert set(ta) == set(tb)  # the fixed side dropped in both; gated q keeps its gate rows
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-7, msg=k)


def test_pro_refuses_dora(tmp_path: Path, cli) -> None:
    pre = build_base(tmp_path, "qwen3", DENSE)
    adapter = build_adapter(
        pre, tmp_path / "dora", r=4, lora_alpha=8, target_modules=QKVO, use_dora=True
    )
    out = tmp_path / "out"
    r = cli("pro", pre, adapter, "-o", out, "--device", "cpu")
    assert r.code == 2
    assert len(r.err_lines) == 1 and "DoRA" in r.err and "not low-rank" in r.err
    assert not out.exists()


def test_pro_refuses_mla(tmp_path: Path, cli) -> None:
    """Kimi Linear's MLA layers have no single W_Q/W_K pair per head: refused, as for checkpoints."""
    from test_families_kimi_zamba import KIMI

    pre = build_base(tmp_path, "kimi_linear", KIMI)
    adapter = build_adapter(
        pre, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "kv_b_proj"]
    )
    r = cli("pro", pre, adapter, "-o", tmp_path / "out", "--device", "cpu")
    assert r.code == 2 and "MLA" in r.err and not (tmp_path / "out").exists()
