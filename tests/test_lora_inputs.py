"""Adapter inputs: peft's matching rules, bad input refused in one line, inspect and verify.

The config semantics are checked against peft's own ``check_target_module_exists`` and
``LoraLayer.scaling`` on every module of a model, not against a restatement of them.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, leftovers
from lora_fixtures import DENSE, build_adapter, build_base, load_base, merged_state
from safetensors.torch import load_file, save_file

from qkrestore.adapter.config import read_adapter_config
from qkrestore.adapter.write import exclude_regex

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dense")
    pre = build_base(root, "qwen3", DENSE)
    return pre, build_adapter(pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gated")
    pre = build_base(root, "qwen3_next", QWEN3_NEXT)
    return pre, build_adapter(pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)


# -- peft's semantics -----------------------------------------------------------------------------

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj"},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": QKVO, "exclude_modules": ["layers.0.self_attn.k_proj"]},
    {"target_modules": QKVO, "exclude_modules": r".*\.1\.self_attn\.o_proj"},
    {
        "target_modules": QKVO,
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 5},
    },
    {"target_modules": QKVO, "use_rslora": True, "rank_pattern": {"v_proj": 6}},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_config_matches_peft(kwargs: dict, dense, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    pre, _ = dense
    adapter = build_adapter(pre, tmp_path / "a", r=4, lora_alpha=8, **kwargs)
    ours = read_adapter_config(adapter)
    peft_model = get_peft_model(load_base(pre), LoraConfig(r=4, lora_alpha=8, **kwargs))
    model = peft_model.base_model.model
    lora_layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    names = [n for n, m in load_base(pre).named_modules() if isinstance(m, torch.nn.Linear)]
    for name in names:
        assert ours.targets(name) == (name in lora_layers), name
        if name in lora_layers:
            assert ours.rank_and_alpha(name)[0] == lora_layers[name].r["default"], name
            assert ours.scaling(name) == pytest.approx(lora_layers[name].scaling["default"]), name


@pytest.mark.parametrize(
    "existing", [None, ["layers.0.self_attn.v_proj"], r".*layers\.1\.self_attn\.o_proj"]
)
def test_exclude_modules_peft_honours(existing, dense) -> None:
    """The rewritten exclude_modules excludes exactly the old set plus the dropped modules."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    pre, _ = dense
    names = [n for n, m in load_base(pre).named_modules() if isinstance(m, torch.nn.Linear)]
    dropped = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    old = LoraConfig(target_modules=QKVO, exclude_modules=existing)
    new = LoraConfig(target_modules=QKVO, exclude_modules=exclude_regex(existing, dropped))
    for n in names:
        want = bool(check_target_module_exists(old, n)) and n not in dropped
        assert bool(check_target_module_exists(new, n)) == want, n


# -- bad input: one line, exit 2, no OUT ----------------------------------------------------------


def _refused(cli, pre: Path, adapter: Path, out: Path, *words: str) -> None:
    r = cli("merge", pre, adapter, "-o", out)
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1, r.err
    for w in words:
        assert w in r.err, r.err
    assert not out.exists() and not leftovers(out.parent)


def _copy(adapter: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in adapter.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_wrong_base_shape(dense, tmp_path: Path, cli) -> None:
    pre, _ = dense
    (tmp_path / "o").mkdir()
    other = build_base(tmp_path / "o", "qwen3", DENSE | {"hidden_size": 48, "head_dim": 16})
    adapter = build_adapter(other, tmp_path / "a", r=4, lora_alpha=8, target_modules=QKVO)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(cli, pre, adapter, tmp_path / "out", "adapter_model.safetensors", "PRE")


def test_wrong_base_name(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path)  # exists, and is not PRE
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(cli, pre, bad, tmp_path / "out", "base_model_name_or_path")


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_other_peft_methods(method: str, dense, tmp_path: Path, cli) -> None:
    from peft import IA3Config, LoHaConfig, get_peft_model

    pre, _ = dense
    config = (
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
        if method == "IA3"
        else LoHaConfig(target_modules=["q_proj"], r=2)
    )
    get_peft_model(load_base(pre), config).save_pretrained(tmp_path / "a")
    _refused(cli, pre, tmp_path / "a", tmp_path / "out", method, "not supported")


def test_prompt_tuning_config(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    _refused(cli, pre, bad, tmp_path / "out", "PROMPT_TUNING")


def test_regex_that_explains_nothing(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = r".*\.mlp\.nothing"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(cli, pre, bad, tmp_path / "out", "target_modules", "does not select")


def test_truncated_weights(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(cli, pre, bad, tmp_path / "out", "adapter_model.safetensors", "past the end")


def test_lying_header(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k.endswith("lora_B.weight"))
    header[key]["shape"] = [header[key]["shape"][0] * 2, header[key]["shape"][1]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _refused(cli, pre, bad, tmp_path / "out", "adapter_model.safetensors", key)


def test_rank_that_config_does_not_give(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    bad = _copy(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(cli, pre, bad, tmp_path / "out", "rank 4", "r=8")


def test_merge_adapter_needs_an_adapter(dense, tmp_path: Path, cli) -> None:
    pre, _ = dense
    r = cli("merge", pre, pre, "-o", tmp_path / "out", "--merge-adapter")
    assert r.code == 2 and "not a PEFT adapter" in r.err
    assert not (tmp_path / "out").exists()


# -- carried files, inspect, verify ---------------------------------------------------------------


def test_other_files_carried_and_exclusion(gated, tmp_path: Path, cli) -> None:
    pre, adapter = gated
    src = _copy(adapter, tmp_path / "src")
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    assert cli("merge", pre, src, "-o", out).code == 0
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    tensors = load_file(out / "adapter_model.safetensors")
    # Full-attention layers 1, 3: k_proj dropped, gated q_proj kept with zero query rows.
    assert not any(re.search(r"layers\.[13]\.self_attn\.k_proj", k) for k in tensors)
    for i in (1, 3):
        b = tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
        for h in range(2):
            assert torch.all(b[h * 32 : h * 32 + 16] == 0) and torch.any(
                b[h * 32 + 16 : h * 32 + 32] != 0
            )
    model = tmp_path / "model"
    assert cli("merge", pre, src, "-o", model, "--merge-adapter").code == 0
    assert (model / "chat_template.jinja").read_bytes() == (
        src / "chat_template.jinja"
    ).read_bytes()
    assert (model / "tokenizer_config.json").read_bytes() == (
        src / "tokenizer_config.json"
    ).read_bytes()


def test_inspect_layers_adapter(gated, cli) -> None:
    pre, adapter = gated
    r = cli("inspect-layers", adapter, "--base", pre, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["global_layers"] == [1, 3]
    actions = {m["module"]: m["action"] for m in doc["modules"]}
    for i in (1, 3):
        a = f"model.layers.{i}.self_attn."
        assert actions[a + "q_proj"] == "zero" and actions[a + "k_proj"] == "drop"
        assert actions[a + "v_proj"] == "keep" and actions[a + "o_proj"] == "keep"
    # Without --base, a base the adapter names as an existing folder is used...
    r2 = cli("inspect-layers", adapter, "--json")
    assert r2.code == 0 and json.loads(r2.out)["modules"] == doc["modules"]


def test_inspect_layers_adapter_without_base(gated, tmp_path: Path, cli) -> None:
    """...and a Hub id cannot be: the adapter's own facts, and a note asking for --base."""
    _, adapter = gated
    other = _copy(adapter, tmp_path / "a")
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-Next-80B-A3B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("inspect-layers", other)
    assert r.code == 0 and "--base" in r.err and "model.layers.3.self_attn.k_proj" in r.out


def test_verify_adapter_output(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    for extra in ([], ["--merge-adapter"]):
        out = tmp_path / f"out{len(extra)}"
        assert cli("merge", pre, adapter, "-o", out, *extra).code == 0
        r = cli("verify", out, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["tensors_checked"] > 0
    # Tamper: a kept module's B changed → verify fails, naming the tensor.
    out = tmp_path / "out0"
    f = out / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, f, metadata={"format": "pt"})
    r = cli("verify", out)
    assert r.code == 1 and "model.layers.0.self_attn.v_proj.weight" in r.err


def test_dry_run_writes_nothing(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    r = cli("merge", pre, adapter, "-o", tmp_path / "out", "--dry-run", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["dry_run"] and doc["adapter_plan"]["counts"] == {"drop": 4, "keep": 4}
    assert not (tmp_path / "out").exists()


def test_loads_without_missing_keys_warning_and_runs(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    out = tmp_path / "out"
    assert cli("merge", pre, adapter, "-o", out).code == 0
    _, warns = merged_state(pre, out)
    assert not [w for w in warns if "missing" in w.lower()], warns


def test_adapter_of_routing_only_modules(dense, tmp_path: Path, cli) -> None:
    """Every module routing: no adapter can be written (peft would refuse an empty one); the
    merged model is PRE itself."""
    from conftest import load_all

    pre, _ = dense
    adapter = build_adapter(
        pre, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]
    )
    _refused(cli, pre, adapter, tmp_path / "out", "empty")
    out = tmp_path / "model"
    assert cli("merge", pre, adapter, "-o", out, "--merge-adapter").code == 0
    got, _ = load_all(out)
    want, _ = load_all(pre)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_saved_tied_lm_head(tmp_path: Path, cli) -> None:
    """A saved lm_head that PRE ties to the embeddings (not stored): fine for adapter out, refused
    for model out, where it would have nowhere to go."""
    pre = build_base(tmp_path, "qwen3", DENSE | {"tie_word_embeddings": True})
    adapter = build_adapter(
        pre, tmp_path / "a", r=4, lora_alpha=8, target_modules=QKVO, modules_to_save=["lm_head"]
    )
    assert "base_model.model.lm_head.weight" in load_file(adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    r = cli("merge", pre, adapter, "-o", out)
    assert r.code == 0, r.err
    assert "base_model.model.lm_head.weight" in load_file(out / "adapter_model.safetensors")
    r = cli("merge", pre, adapter, "-o", tmp_path / "model", "--merge-adapter")
    assert r.code == 2 and "does not store" in r.err and not (tmp_path / "model").exists()


def test_tensor_pattern_on_adapter(dense, tmp_path: Path, cli) -> None:
    """--tensor-pattern names the restored tensors by hand, for adapters as for checkpoints."""
    pre, adapter = dense
    out = tmp_path / "out"
    r = cli(
        "merge",
        pre,
        adapter,
        "-o",
        out,
        "--layers",
        "1",
        "--tensor-pattern",
        r"model\.layers\.{i}\.self_attn\.v_proj\.weight",
        "--json",
    )
    assert r.code == 0, r.err
    actions = {m["module"]: m["action"] for m in json.loads(r.out)["adapter_plan"]["modules"]}
    assert actions["model.layers.1.self_attn.v_proj"] == "drop"
    assert [a for a in actions.values() if a != "keep"] == ["drop"]
