"""Issue 14 point 9: folders from elsewhere. Links stay inside, only regular files, OUT's mode."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import leftovers, write_checkpoint
from test_handwritten_families import model_tensors, perturbed

import qkrestore

CONFIG = {"model_type": "x", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
SRC = Path(qkrestore.__file__).resolve().parents[1]  # the qkrestore these tests import


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    t = model_tensors([True, True], False, seed=51)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, t, shards=2)
    post = write_checkpoint(tmp_path / "post", CONFIG, perturbed(t, seed=52), shards=3)
    (post / "tokenizer.json").write_text('{"model": "tiny"}')
    return pre, post


def refused_naming(res, tmp_path: Path, *needles: str) -> None:
    assert res.code == 2, (res.code, res.err)
    assert len(res.err_lines) == 1, res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_link_out_of_post_is_refused(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (post / "notes.txt").symlink_to(secret)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    refused_naming(res, tmp_path, "notes.txt", "outside the folder")
    assert "password" not in res.err


def test_link_to_a_folder_outside_is_refused(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("x")
    (post / "extra").symlink_to(elsewhere, target_is_directory=True)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    refused_naming(res, tmp_path, "extra", "outside the folder")


def test_pre_config_linked_outside_is_refused(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    outside = tmp_path / "config-elsewhere.json"
    shutil.move(pre / "config.json", outside)
    (pre / "config.json").symlink_to(outside)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    refused_naming(res, tmp_path, "PRE", "config.json", "outside the folder")


def test_fifo_in_post_is_refused_without_hanging(pair, tmp_path: Path) -> None:
    pre, post = pair
    os.mkfifo(post / "pipe")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "qkrestore", "merge", pre, post, "-o", tmp_path / "out"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("merge hung on a FIFO in POST")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "pipe" in lines[0] and "FIFO" in lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_links_inside_the_folder_are_copied_as_files(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    (post / "tokenizer_alias.json").symlink_to("tokenizer.json")
    (post / "sub").mkdir()
    (post / "sub" / "up.json").symlink_to("../tokenizer.json")
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    for rel in ("tokenizer_alias.json", "sub/up.json"):
        assert not (out / rel).is_symlink() and (out / rel).is_file(), rel
        assert (out / rel).read_bytes() == (post / "tokenizer.json").read_bytes()


def as_hf_cache(folder: Path, cache: Path) -> Path:
    """Lay a folder out like the Hub cache: blobs by hash, a snapshot of relative links."""
    entry = cache / "models--org--tiny"
    snap = entry / "snapshots" / ("0" * 40)
    (entry / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, entry / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


def test_hub_cache_snapshot_links_are_followed(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    snap = as_hf_cache(post, tmp_path / "hub")
    out = tmp_path / "out"
    res = cli("merge", pre, snap, "-o", out, "--quiet")
    assert res.code == 0, res.err
    for f in post.iterdir():
        assert not (out / f.name).is_symlink()
        if f.suffix != ".safetensors" and f.name != "README.md":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_out_gets_the_mode_mkdir_would_give(pair, tmp_path: Path, cli, umask: int) -> None:
    pre, post = pair
    old = os.umask(umask)
    try:
        res = cli("merge", pre, post, "-o", tmp_path / "out", "--quiet")
        (tmp_path / "made-by-mkdir").mkdir()
    finally:
        os.umask(old)
    assert res.code == 0, res.err
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o777 & ~umask
    assert mode == stat.S_IMODE((tmp_path / "made-by-mkdir").stat().st_mode)
