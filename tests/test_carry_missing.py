"""Tensors PRE has and POST lacks (a trainer's save that dropped ``mtp.*``): reported, and with
``--carry-missing`` copied from PRE byte for byte into an extra shard that OUT's index lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, build_hf_pair, load_all, raw, sha
from safetensors.torch import save_file

from qkrestore.surgery.carried import CARRIED_FILE

EXTRA = {"mtp.fc.weight": (8, 32), "mtp.norm.weight": (32,)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """PRE (one file) with two mtp.* tensors that POST (sharded) lacks."""
    pre, post = build_hf_pair(tmp_path_factory.mktemp("carry"), "qwen3_next", QWEN3_NEXT)
    tensors, meta = load_all(pre)
    g = torch.Generator().manual_seed(7)
    tensors |= {n: torch.randn(shape, generator=g) for n, shape in EXTRA.items()}
    save_file(tensors, str(pre / "model.safetensors"), metadata=meta["model.safetensors"])
    return pre, post


def test_missing_tensors_are_reported(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["missing_in_post"] == sorted(EXTRA)
    assert "PRE has 2 tensors POST lacks (mtp.* (2))" in res.err and "--carry-missing" in res.err
    got, _ = load_all(tmp_path / "out")
    assert not set(EXTRA) & set(got)
    info = json.loads(cli("inspect-layers", post, "--compare", pre, "--json").out)
    assert info["compare"]["only_in_other"] == sorted(EXTRA)
    assert info["compare"]["only_in_model"] == []


def test_carry_missing_copies_them_from_pre(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--carry-missing", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert [c["name"] for c in doc["plan"]["carried"]] == sorted(EXTRA)
    got, _ = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, _ = load_all(post)
    assert set(got) == set(post_t) | set(EXTRA)
    for name in EXTRA:
        assert raw(got[name]) == raw(pre_t[name]) and got[name].dtype == pre_t[name].dtype
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    post_index = json.loads((post / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == post_index | {n: CARRIED_FILE for n in EXTRA}
    for shard in set(post_index.values()):  # POST's untouched shards stay byte-identical
        if shard not in {p["file"] for p in doc["plan"]["tensors"]}:
            assert sha(out / shard) == sha(post / shard)
    assert cli("verify", out, "--forward", "never").code == 0
    # transformers reads OUT through its index: the carried tensors are in the file it maps
    from safetensors import safe_open

    with safe_open(str(out / index["mtp.fc.weight"]), "pt") as fh:
        assert raw(fh.get_tensor("mtp.fc.weight")) == raw(pre_t["mtp.fc.weight"])


def test_verify_catches_a_changed_carried_tensor(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--carry-missing", "-q").code == 0
    data = bytearray((out / CARRIED_FILE).read_bytes())
    data[-1] ^= 0x01
    (out / CARRIED_FILE).write_bytes(bytes(data))
    res = cli("verify", out, "--forward", "never")
    assert res.code == 1 and "mtp.norm.weight" in res.err and "carried" in res.err


def test_single_file_post_cannot_take_carried_tensors(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    # POST re-saved as one model.safetensors (still without the mtp tensors)
    tensors, _ = load_all(post)
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_bytes((post / "config.json").read_bytes())
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    res = cli("merge", pre, single, "-o", tmp_path / "out", "--carry-missing")
    assert res.code == 2 and "needs POST saved in shards" in res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
