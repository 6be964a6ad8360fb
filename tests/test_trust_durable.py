"""Issue 14 point 4: every written file, then the staging folder, is fsynced before the rename onto
OUT, and OUT's parent after it. Observed by wrapping ``os.fsync`` and ``os.rename`` (the kernel's
calls, not qkrestore's code) and naming each fsynced descriptor through /proc/self/fd.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from conftest import write_checkpoint
from test_handwritten_families import model_tensors, perturbed

CONFIG = {"model_type": "x", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    t = model_tensors([True, True], False, seed=61)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, t, shards=2)
    post = write_checkpoint(tmp_path / "post", CONFIG, perturbed(t, seed=62), shards=3)
    (post / "sub").mkdir()
    (post / "sub" / "extra.json").write_text("{}")
    return pre, post


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    log: list[tuple[str, ...]] = []
    lock = threading.Lock()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        with lock:
            log.append(("fsync", path))

    def rename(src, dst, *a, **kw) -> None:
        real_rename(src, dst, *a, **kw)
        with lock:
            log.append(("rename", os.path.abspath(src), os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return log


def check_order(log: list[tuple[str, ...]], out: Path) -> None:
    final = [i for i, e in enumerate(log) if e[0] == "rename" and e[2] == str(out)]
    assert len(final) == 1, log
    r = final[0]
    staging = Path(log[r][1])
    synced_before = {e[1]: i for i, e in enumerate(log[:r]) if e[0] == "fsync"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for p in files:  # every file, under its staging name, before the rename
        assert str(staging / p.relative_to(out)) in synced_before, p
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        assert str(staging / d.relative_to(out)) in synced_before, d
    last_file = max(synced_before[str(staging / p.relative_to(out))] for p in files)
    assert synced_before.get(str(staging), -1) > last_file  # then the staging folder
    after = [e for e in log[r + 1 :] if e[0] == "fsync"]
    assert ("fsync", str(out.parent)) in after  # the parent, after the rename


def test_fsync_order_on_a_new_output(pair, tmp_path: Path, cli, events) -> None:
    pre, post = pair
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    check_order(events, out)


def test_fsync_order_when_replacing_an_output(pair, tmp_path: Path, cli, events) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "--quiet").code == 0
    events.clear()
    res = cli("merge", pre, post, "-o", out, "--quiet", "--overwrite", "--link")
    assert res.code == 0, res.err
    check_order(events, out)
