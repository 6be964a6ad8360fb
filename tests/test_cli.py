"""The merge / verify / inspect-layers commands as a user meets them: outputs, errors, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import leftovers, load_all, raw, resolve_rows, routing_rows, sha, write_checkpoint
from test_handwritten_families import model_tensors, perturbed

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 3,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    pre_t = model_tensors([True, True, True], bias=False, seed=11)
    post_t = perturbed(pre_t, seed=12)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, pre_t, shards=1)
    post = write_checkpoint(
        tmp_path / "post", CONFIG, post_t, shards=4, metadata={"format": "pt", "x": "1"}
    )
    (post / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (post / "chat_template.jinja").write_text("{{ messages }}")
    (post / "generation_config.json").write_text('{"do_sample": false}')
    (post / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags:\n- sft\n---\n# My SFT model\nHello.\n"
    )
    return pre, post


def tree_sha(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_merge_writes_post_layout_card_and_provenance(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    before = tree_sha(pre) | {f"post/{k}": v for k, v in tree_sha(post).items()}
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--layers", "1")
    assert res.code == 0, res.err
    # inputs untouched, no temporary folder left
    assert tree_sha(pre) | {f"post/{k}": v for k, v in tree_sha(post).items()} == before
    assert leftovers(tmp_path) == []

    # same files as POST, index byte-identical, untouched shards byte-identical
    post_files = {p.name for p in post.iterdir()}
    assert {p.name for p in out.iterdir()} == post_files | {"qkrestore.json", ".cache"}
    assert sha(out / "model.safetensors.index.json") == sha(post / "model.safetensors.index.json")
    expected = resolve_rows(routing_rows(load_all(post)[0], [1]), load_all(post)[0])
    index = json.loads((post / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {index[n] for n in expected}
    for shard in sorted(post.glob("*.safetensors")):
        same = sha(out / shard.name) == sha(shard)
        assert same == (shard.name not in touched), shard.name
    assert 0 < len(touched) < 4

    # model card
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    # Local folders have no Hub id: the Hub's model tree cannot resolve paths (issue 14, point 11).
    assert "base_model" not in front and "base_model_relation" not in front
    assert front["library_name"] == "transformers"
    assert {"qk-restore", "merge", "sft"} <= set(front["tags"])
    assert front["license"] == "apache-2.0"
    assert "QK-Restore" in text and "**Layers:** 1 of 3" in text and "--layers 1" in text
    assert "# My SFT model" in text  # POST's own card is kept

    # provenance: sha256 of each restored tensor as it is in OUT
    record = json.loads((out / "qkrestore.json").read_text())
    assert record["version"] and "merge" in record["command"]
    assert record["sources"]["pre"] == {"source": pre.name, "hub_id": None}
    assert record["plan"]["layers"] == [1]
    got, _ = load_all(out)
    assert set(record["tensor_sha256"]) == set(expected)
    for name, digest in record["tensor_sha256"].items():
        assert hashlib.sha256(raw(got[name])).hexdigest() == digest


def test_dry_run_writes_nothing_and_json_is_parseable(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--dry-run", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["dry_run"] is True and doc["layers"] == [0, 1, 2]
    names = {t["name"] for t in doc["plan"]["tensors"]}
    assert names == {
        f"model.layers.{i}.self_attn.{p}.weight"
        for i in range(3)
        for p in ("q_proj", "k_proj", "q_norm", "k_norm")
    }
    assert not out.exists() and leftovers(tmp_path) == []
    human = cli("merge", pre, post, "-o", out, "--dry-run")
    assert human.code == 0 and "q_proj" in human.out and not out.exists()


def test_targets_v_and_o(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--targets", "q,k,v,o", "--quiet").code == 0
    post_t, _ = load_all(post)
    expected = resolve_rows(routing_rows(post_t, [0, 1, 2], targets=("q", "k", "v", "o")), post_t)
    assert "model.layers.1.self_attn.o_proj.weight" in expected
    from conftest import assert_merged

    assert_merged(out, pre, post, expected)


def test_verify_detects_a_flipped_byte_and_names_the_tensor(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    res = cli("verify", out, "--json", "--forward", "never")
    assert res.code == 0, res.err
    assert json.loads(res.out)["ok"] is True

    for victim in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        shard = out / index[victim]
        data = bytearray(shard.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        begin = 8 + n + header[victim]["data_offsets"][0] + 5
        data[begin] ^= 0x01
        shard.write_bytes(bytes(data))
        res = cli("verify", out, "--forward", "never")
        assert res.code == 1
        assert victim in res.err
        data[begin] ^= 0x01
        shard.write_bytes(bytes(data))
    assert cli("verify", out, "--forward", "never").code == 0


def test_verify_detects_changed_extra_file(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    (out / "tokenizer.json").write_text("{}")
    res = cli("verify", out)
    assert res.code == 1 and "tokenizer.json" in res.err


def one_line_error(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("error:")
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)


def test_missing_input_folder(pair, tmp_path: Path, cli) -> None:
    _, post = pair
    res = cli("merge", tmp_path / "nope", post, "-o", tmp_path / "out")
    one_line_error(res, "nope", "PRE")
    assert not (tmp_path / "out").exists()


def test_missing_shard_file(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    victim = sorted(post.glob("model-*.safetensors"))[1]
    victim.unlink()
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    one_line_error(res, victim.name, "missing")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_tensor_absent_in_pre(tmp_path: Path, cli) -> None:
    pre_t = model_tensors([True, True, True], False, seed=1)
    post_t = perturbed(pre_t, seed=2)
    del pre_t["model.layers.1.self_attn.k_proj.weight"]
    pre = write_checkpoint(tmp_path / "pre", CONFIG, pre_t)
    post = write_checkpoint(tmp_path / "post", CONFIG, post_t)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    one_line_error(res, "model.layers.1.self_attn.k_proj.weight", "PRE")
    assert not (tmp_path / "out").exists()


def test_tensor_of_other_shape_in_pre(tmp_path: Path, cli) -> None:
    pre_t = model_tensors([True, True, True], False, seed=1)
    post_t = perturbed(pre_t, seed=2)
    pre_t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, pre_t)
    post = write_checkpoint(tmp_path / "post", CONFIG, post_t)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    one_line_error(res, "model.layers.0.self_attn.q_proj.weight", "[16, 32]", "[32, 32]")
    assert not (tmp_path / "out").exists()


def test_layer_that_is_not_attention(tmp_path: Path, cli) -> None:
    config = {
        "model_type": "x",
        "num_hidden_layers": 3,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    }
    pre_t = model_tensors([False, True, False], False, seed=1)
    pre = write_checkpoint(tmp_path / "pre", config, pre_t)
    post = write_checkpoint(tmp_path / "post", config, perturbed(pre_t, seed=2))
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--layers", "0,1")
    one_line_error(res, "layer 0", "not a softmax-attention layer", "attention layers: 1")
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--layers", "7")
    one_line_error(res, "layer 7")
    assert not (tmp_path / "out").exists()


def test_out_exists_without_overwrite(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("merge", pre, post, "-o", out)
    one_line_error(res, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == []
    res = cli("merge", pre, post, "-o", out, "--overwrite", "--quiet")
    assert res.code == 0, res.err
    assert not (out / "keep.txt").exists() and (out / "qkrestore.json").exists()
    assert leftovers(tmp_path) == []


def test_out_inside_an_input_is_refused(pair, cli) -> None:
    pre, post = pair
    for out in (post / "sub", pre, post):
        res = cli("merge", pre, post, "-o", out, "--overwrite")
        one_line_error(res, "must not")
    assert not (post / "sub").exists()


def test_index_naming_a_file_outside_the_folder(pair, tmp_path: Path, cli) -> None:
    _, post = pair
    index_path = post / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for evil in (
        "../pre/model.safetensors",
        "/etc/passwd",
        "a\\..\\b.safetensors",
        "x\x00.safetensors",
    ):
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = evil
        index_path.write_text(json.dumps(index))
        res = cli("inspect-layers", post)
        one_line_error(res, "model.safetensors.index.json", "not a plain file inside the folder")


def test_pickle_checkpoint_is_never_loaded(tmp_path: Path, cli) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    res = cli("inspect-layers", model)
    one_line_error(res, "pytorch_model.bin", "safetensors")


def test_inspect_layers_table_and_compare(pair, cli) -> None:
    pre, post = pair
    res = cli("inspect-layers", post, "--compare", pre, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["model_type"] == "llama" and doc["adapter"] == "llama" and doc["num_layers"] == 3
    assert "Llama" in doc["adapter_description"] and doc["adapter_notes"] == []
    q = next(t for t in doc["layers"][0]["tensors"] if t["name"].endswith("q_proj.weight"))
    assert q["rows"] == [[0, 32]] and q["shape"] == [32, 32] and q["dtype"] == "F32"
    assert q["file"].startswith("model-0000")
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    for row in doc["compare"]["layers"]:
        name = f"model.layers.{row['layer']}.self_attn.q_proj.weight"
        a, b = post_t[name].double(), pre_t[name].double()
        assert row["q"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-9)
    human = cli("inspect-layers", post, "--compare", pre)
    assert human.code == 0 and "drift" in human.out and "k_norm" in human.out


def test_help_has_examples(cli) -> None:
    for cmd in ("merge", "inspect-layers", "verify", "demo"):
        res = cli(cmd, "--help")
        assert res.code == 0
        assert "Examples" in res.out and f"qkrestore {cmd}" in res.out


def test_console_script_runs_demo(tmp_path: Path) -> None:
    """The Quickstart's first command, as a subprocess: exit 0 and a verified output."""
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-m", "qkrestore", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "match the plan" in proc.stdout and "Traceback" not in proc.stderr
    assert (tmp_path / "demo" / "post-qkrestore" / "qkrestore.json").is_file()


def test_usage_error_exit_code(cli) -> None:
    res = cli("merge", "--bogus")
    assert res.code == 2


def test_demo_json(tmp_path: Path, cli) -> None:
    res = cli("demo", "--workdir", tmp_path / "d", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["ok"] and (Path(doc["output"]) / "qkrestore.json").is_file()


def test_json_is_strict_when_a_drift_is_undefined(tmp_path: Path, cli) -> None:
    """An all-zero reference tensor has no relative drift: --json says null, never NaN."""
    pre_t = model_tensors([True, True, True], bias=False, seed=11)
    pre_t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, pre_t)
    post = write_checkpoint(tmp_path / "post", CONFIG, perturbed(pre_t, seed=12))
    res = cli("inspect-layers", pre, "--compare", post, "--json")
    assert res.code == 0, res.err
    assert "NaN" not in res.out
    doc = json.loads(res.out)
    assert doc["compare"]["layers"][0]["q"] is None
    assert doc["compare"]["layers"][1]["q"] > 0
