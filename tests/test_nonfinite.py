"""Issue 22 class 2 and 3: non-finite values are refused where they enter or are made, verify
reports them instead of crashing, and a damaged provenance record is refused naming the field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import leftovers
from lora_fixtures import DENSE, build_adapter, build_base
from safetensors.torch import load_file, save_file

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model.model.layers.0.self_attn."


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    pre = build_base(root, "qwen3", DENSE)
    return pre, build_adapter(pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)


def _poison(folder: Path, file: str, key: str, value: float) -> None:
    t = load_file(folder / file)
    t[key][0, 0] = value
    save_file(t, folder / file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("v_proj.lora_B.weight", float("nan")), ("o_proj.lora_A.weight", float("inf"))],
)
@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_non_finite_adapter_factor_is_refused_naming_it(
    dense, tmp_path: Path, cli, key: str, value: float, extra: list[str]
) -> None:
    pre, adapter = dense
    src = shutil.copytree(adapter, tmp_path / "src")
    _poison(src, "adapter_model.safetensors", PREFIX + key, value)
    out = tmp_path / "out"
    res = cli("merge", pre, src, "-o", out, *extra)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert PREFIX + key in res.err and "NaN or Inf" in res.err
    assert "adapter_model.safetensors" in res.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_finite_qk_pro_solution_is_refused(dense, tmp_path: Path, cli) -> None:
    """POST (a checkpoint) with an Inf in W_Q: the solve yields non-finite rows, refused by name."""
    pre, _ = dense
    post = shutil.copytree(pre, tmp_path / "post")
    name = "model.layers.1.self_attn.q_proj.weight"
    _poison(post, "model.safetensors", name, float("inf"))
    out = tmp_path / "out"
    res = cli("pro", pre, post, "-o", out, "--device", "cpu", "--quiet")
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert name in res.err and "not finite" in res.err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("extra", "file", "key"),
    [
        ([], "adapter_model.safetensors", PREFIX + "v_proj.lora_A.weight"),
        (["--merge-adapter"], "model.safetensors", "model.layers.0.self_attn.v_proj.weight"),
    ],
)
def test_verify_reports_non_finite_values(
    dense, tmp_path: Path, cli, extra: list[str], file: str, key: str
) -> None:
    pre, adapter = dense
    out = tmp_path / "out"
    assert cli("merge", pre, adapter, "-o", out, *extra).code == 0
    _poison(out, file, key, float("nan"))
    res = cli("verify", out)
    assert res.code == 1, res.err
    assert "model.layers.0.self_attn.v_proj.weight" in res.err and "NaN or Inf" in res.err


# -- the provenance record ------------------------------------------------------------------------

BAD_FIELDS = {
    "adapter_job.output_kind": lambda r: r["adapter_job"].update(output_kind="bogus"),
    "sources.pre": lambda r: r["sources"].update(pre=5),
    "plan.tensors[0].rows": lambda r: r["plan"]["tensors"][0].update(rows=[[9, 2]]),
    "plan.tensors[0].source": lambda r: r["plan"]["tensors"][0].update(source="elsewhere"),
    "plan.tensors[0].file": lambda r: r["plan"]["tensors"][0].update(file="../x.safetensors"),
}


@pytest.mark.parametrize("field", list(BAD_FIELDS))
@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_bad_provenance_field_is_a_clean_error(
    dense, tmp_path: Path, cli, field: str, extra: list[str]
) -> None:
    pre, adapter = dense
    out = tmp_path / "out"
    assert cli("merge", pre, adapter, "-o", out, *extra).code == 0
    record = json.loads((out / "qkrestore.json").read_text())
    BAD_FIELDS[field](record)
    (out / "qkrestore.json").write_text(json.dumps(record))
    res = cli("verify", out)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert f"field '{field}'" in res.err and "qkrestore.json" in res.err


def test_verify_after_pre_moved_hints_at_pre_and_post(dense, tmp_path: Path, cli) -> None:
    pre0, adapter0 = dense
    pre = shutil.copytree(pre0, tmp_path / "pre")
    adapter = shutil.copytree(adapter0, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps(cfg | {"base_model_name_or_path": None})
    )
    out = tmp_path / "out"
    assert cli("merge", pre, adapter, "-o", out).code == 0
    moved = tmp_path / "moved"
    shutil.move(pre, moved)
    res = cli("verify", out)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "--pre PATH" in res.err and "--post" in res.err
    assert cli("verify", out, "--pre", moved).code == 0
