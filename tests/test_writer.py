"""The writer's fast paths are exact: kernel copies, hard links, chunked patches and casts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_merged,
    load_all,
    perturbed,
    resolve_rows,
    routing_rows,
    sha,
    write_checkpoint,
)
from test_handwritten_families import model_tensors

from qkrestore.surgery import writer

CONFIG = {
    "model_type": "x",
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention"] * 2,
}
KINDS = [False, True, False, True]


def pair(tmp: Path, pre_dtype=torch.float32, post_dtype=torch.float32, shards: int = 4):
    pre_t = {n: t.to(pre_dtype) for n, t in model_tensors(KINDS, True, seed=21).items()}
    post_t = {
        n: t.to(post_dtype)
        for n, t in perturbed(model_tensors(KINDS, True, seed=21), seed=22).items()
    }
    pre = write_checkpoint(tmp / "pre", CONFIG, pre_t, shards=2)
    post = write_checkpoint(tmp / "post", CONFIG, post_t, shards=shards)
    return pre, post


def expected_rows(post: Path) -> dict:
    post_t, _ = load_all(post)
    return resolve_rows(routing_rows(post_t, [1, 3]), post_t)


def test_link_shares_untouched_shards_and_copies_touched_ones(tmp_path: Path, cli) -> None:
    pre, post = pair(tmp_path, shards=6)
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--link", "--json")
    assert res.code == 0, res.err
    assert_merged(out, pre, post, expected_rows(post))
    linked = 0
    for shard in post.glob("*.safetensors"):
        same_inode = os.stat(out / shard.name).st_ino == os.stat(shard).st_ino
        identical = sha(out / shard.name) == sha(shard)
        assert same_inode == identical, shard.name  # linked iff untouched
        linked += same_inode
    assert linked >= 1
    # non-weight files are copies, never links
    assert os.stat(out / "config.json").st_ino != os.stat(post / "config.json").st_ino


@pytest.mark.parametrize("chunk", [1000, 4099, 65536])
def test_restored_tensors_straddling_chunks(tmp_path: Path, cli, monkeypatch, chunk: int) -> None:
    """Tiny chunk sizes force every restored range and every copy to cross chunk boundaries."""
    monkeypatch.setattr(writer, "CHUNK", chunk)
    monkeypatch.setattr(writer, "KERNEL_COPY_CHUNK", chunk * 3 + 1)
    pre, post = pair(tmp_path)
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    assert_merged(out, pre, post, expected_rows(post))


def test_chunked_cast_straddling_chunks(tmp_path: Path, cli, monkeypatch) -> None:
    monkeypatch.setattr(writer, "CHUNK", 1002)
    pre, post = pair(tmp_path, pre_dtype=torch.float32, post_dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    assert_merged(out, pre, post, expected_rows(post), cast=True)


def test_parallel_and_serial_outputs_are_identical(tmp_path: Path, cli) -> None:
    pre, post = pair(tmp_path, shards=5)
    for jobs in ("1", "4"):
        assert (
            cli("merge", pre, post, "-o", tmp_path / f"out{jobs}", "-j", jobs, "--quiet").code == 0
        )
    files = sorted(p.name for p in (tmp_path / "out1").iterdir() if p.suffix == ".safetensors")
    assert files and all(sha(tmp_path / "out1" / f) == sha(tmp_path / "out4" / f) for f in files)
    assert_merged(tmp_path / "out4", pre, post, expected_rows(post))


def test_bytes_read_from_pre_are_only_the_restored_rows(tmp_path: Path, cli) -> None:
    import json

    pre, post = pair(tmp_path)
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--json")
    doc = json.loads(res.out)
    assert doc["bytes_read_from_pre"] == doc["restored_bytes"] > 0
    post_t, _ = load_all(post)
    want = sum(
        post_t[n][a:b].numel() * post_t[n].element_size()
        for n, rows in expected_rows(post).items()
        for a, b in rows
    )
    assert doc["restored_bytes"] == want
