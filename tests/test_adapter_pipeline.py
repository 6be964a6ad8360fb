"""Issue 21 point 1 / issue 22: a PEFT adapter POST goes through the one job pipeline and keeps the
promises a checkpoint POST keeps: fsync of every file, --pre-weights, --jobs, untrusted-folder
rules, no local path in what is pushed, variants refused by name, cross-gram with --merge-adapter.

Adapters are built by peft itself (lora_fixtures); the kernel calls (fsync, copy_file_range) are
observed, never qkrestore's own functions.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import leftovers, load_all
from lora_fixtures import DENSE, build_adapter, build_base, load_base
from test_provenance import pushed_files
from test_trust_durable import check_order, events  # noqa: F401 (a fixture)

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    pre = build_base(root, "qwen3", DENSE)
    adapter = build_adapter(pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)
    (adapter / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (adapter / "sub").mkdir()
    (adapter / "sub" / "extra.json").write_text("{}")
    return pre, adapter


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- one staging + fsync + rename ------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_every_adapter_output_file_is_fsynced_before_the_rename(
    dense,
    tmp_path: Path,
    cli,
    events,  # noqa: F811 (the fixture imported from test_trust_durable)
    extra: list[str],
) -> None:
    pre, adapter = dense
    out = tmp_path / "out"
    res = cli("merge", pre, adapter, "-o", out, "--quiet", *extra)
    assert res.code == 0, res.err
    assert (out / "sub" / "extra.json").is_file()
    check_order(events, out)


# -- PRE opened with the job's options ------------------------------------------------------------


def test_pre_weights_is_honoured_with_an_adapter_post(dense, tmp_path: Path, cli) -> None:
    pre0, adapter0 = dense
    pre = _copy(pre0, tmp_path / "pre")
    adapter = _copy(adapter0, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(pre)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    # A stale sharded save of another model lies beside PRE's single file.
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(5)
    stale = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pre))
    stale.save_pretrained(tmp_path / "stale", max_shard_size="40KB")
    for f in (tmp_path / "stale").iterdir():
        if f.name.startswith("model"):
            shutil.copy(f, pre / f.name)
    res = cli("merge", pre, adapter, "-o", tmp_path / "a")
    assert res.code == 2 and "--pre-weights" in res.err
    for extra in ([], ["--merge-adapter"]):
        out = tmp_path / f"out{len(extra)}"
        res = cli("merge", pre, adapter, "-o", out, "--pre-weights", "model.safetensors", *extra)
        assert res.code == 0, res.err
    # The merged model is built on the single file (the set named), not on the stale shards.
    got, _ = load_all(tmp_path / "out1")
    want, _ = load_all(pre0)
    v = "model.layers.0.mlp.down_proj.weight"  # no adapter module: PRE's bytes
    assert torch.equal(got[v], want[v])


# -- --jobs reaches the adapter path ---------------------------------------------------------------


def test_jobs_reach_the_adapter_path(dense, tmp_path: Path, cli, monkeypatch) -> None:
    """With --jobs 3, three kernel copies run at once: the first three copy_file_range calls meet
    at a barrier that two workers (the old fixed pool) could never fill."""
    pre, adapter = dense
    real = os.copy_file_range
    barrier = threading.Barrier(3, timeout=20)
    calls = {"n": 0}
    lock = threading.Lock()

    def copy_file_range(*args, **kw):
        with lock:
            calls["n"] += 1
            first = calls["n"] <= 3
        if first:
            barrier.wait()
        return real(*args, **kw)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    out = tmp_path / "out"
    res = cli("merge", pre, adapter, "-o", out, "--merge-adapter", "--jobs", "3", "--quiet")
    assert res.code == 0, res.err
    assert calls["n"] >= 3


# -- untrusted adapter folders ---------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_outside_symlink_in_an_adapter_folder_is_refused(
    dense, tmp_path: Path, cli, extra: list[str]
) -> None:
    pre, adapter = dense
    src = _copy(adapter, tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (src / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    res = cli("merge", pre, src, "-o", out, *extra)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "notes.txt" in res.err and "outside the folder" in res.err
    assert not out.exists() and leftovers(tmp_path) == []


def _fifo(path: Path) -> None:
    """A FIFO with a writer that gives up after 10 s, so a reader that opened it (the old code)
    gets EOF and the test fails instead of hanging."""
    os.mkfifo(path)

    def writer() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    return
                time.sleep(0.05)
                continue
            os.close(fd)
            return

    threading.Thread(target=writer, daemon=True).start()


@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_fifo_in_an_adapter_folder_is_refused(dense, tmp_path: Path, cli, extra: list[str]) -> None:
    pre, adapter = dense
    src = _copy(adapter, tmp_path / "src")
    _fifo(src / "pipe.txt")
    out = tmp_path / "out"
    res = cli("merge", pre, src, "-o", out, *extra)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "pipe.txt" in res.err and "FIFO" in res.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_fifo_as_adapter_weights_is_never_opened(dense, tmp_path: Path, cli) -> None:
    """inspect-layers reads the adapter too: its weights file as a FIFO is refused, not read."""
    pre, adapter = dense
    src = _copy(adapter, tmp_path / "src")
    (src / "adapter_model.safetensors").unlink()
    _fifo(src / "adapter_model.safetensors")
    res = cli("inspect-layers", src, "--base", pre)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "adapter_model.safetensors" in res.err and "FIFO" in res.err


# -- no local path in what is pushed ---------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--merge-adapter"]])
def test_no_local_path_in_any_adapter_output_file(
    dense, tmp_path: Path, cli, extra: list[str]
) -> None:
    pre, adapter = dense
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(pre)
    out = tmp_path / "out"
    res = cli(
        "merge", str(pre.absolute()), str(adapter.absolute()), "-o", str(out.absolute()), *extra
    )
    assert res.code == 0, res.err
    files = pushed_files(out)
    assert out / "README.md" in files and out / "qkrestore.json" in files
    root = str(pre.parent.absolute())
    for f in files:
        assert root not in f.read_bytes().decode("utf-8", "replace"), f.name
    if not extra:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] is None
        assert "base_model_name_or_path is a local path" in res.err
    assert cli("verify", out).code == 0


def test_adapter_output_names_the_pre_hub_id(dense, tmp_path: Path, cli) -> None:
    pre, adapter = dense
    out = tmp_path / "out"
    assert cli("merge", pre, adapter, "-o", out, "--pre-id", "org/base").code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base"


# -- peft variants refused by name -----------------------------------------------------------------

VARIANTS = {
    "kasa_config": ({"kasa_config": {"beta": 1e-4}}, "KaSA"),
    "use_bdlora": ({"use_bdlora": {"nblocks": 2}}, "BD-LoRA"),
    "arrow_config": ({"arrow_config": {"top_k": 2}}, "Arrow"),
    "monteclora_config": ({"monteclora_config": {"num_samples": 4}}, "MonteCLoRA"),
    "alora_invocation_tokens": ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
    "init_lora_weights": ({"init_lora_weights": "pissa"}, "changed the base weights"),
    "use_future_thing": ({"use_future_thing": True}, "unknown LoRA option"),
}


@pytest.mark.parametrize("key", list(VARIANTS))
def test_lora_variants_refused_by_name(dense, tmp_path: Path, cli, key: str) -> None:
    pre, adapter = dense
    src = _copy(adapter, tmp_path / "src")
    cfg = json.loads((src / "adapter_config.json").read_text())
    change, reason = VARIANTS[key]
    (src / "adapter_config.json").write_text(json.dumps(cfg | change))
    out = tmp_path / "out"
    res = cli("merge", pre, src, "-o", out)
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert key in res.err and reason in res.err and "adapter_config.json" in res.err
    assert not out.exists()


def test_velora_and_mica_merge_as_plain_lora(dense, tmp_path: Path, cli) -> None:
    """Variants that change only training (VeLoRA's backward, MiCA's initialisation) are plain
    LoRA once saved: accepted, with the same output as the plain adapter."""
    pre, adapter = dense
    plain = tmp_path / "plain"
    assert cli("merge", pre, adapter, "-o", plain).code == 0
    src = _copy(adapter, tmp_path / "src")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg |= {"velora_config": {"num_groups": 2}, "init_lora_weights": "mica"}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = cli("merge", pre, src, "-o", out)
    assert res.code == 0, res.err
    name = "adapter_model.safetensors"
    assert (out / name).read_bytes() == (plain / name).read_bytes()


# -- cross-gram on an adapter ----------------------------------------------------------------------


def test_cross_gram_with_merge_adapter_is_pro_on_the_merged_post(
    dense, tmp_path: Path, cli
) -> None:
    from peft import PeftModel

    pre, adapter = dense
    post = tmp_path / "post"
    PeftModel.from_pretrained(load_base(pre), adapter).merge_and_unload().save_pretrained(post)
    common = ("--form", "cross-gram", "--device", "cpu")
    full = tmp_path / "full"
    res = cli("pro", pre, post, "-o", full, *common)
    assert res.code == 0, res.err
    want, _ = load_all(full)

    refused = cli("pro", pre, adapter, "-o", tmp_path / "a", *common)
    assert refused.code == 2 and len(refused.err_lines) == 1, refused.err
    assert "--merge-adapter" in refused.err and "not low-rank" in refused.err
    assert not (tmp_path / "a").exists()

    out = tmp_path / "model"
    res = cli("pro", pre, adapter, "-o", out, *common, "--merge-adapter")
    assert res.code == 0, res.err
    got, _ = load_all(out)
    assert set(got) == set(want)
    for k in got:  # float32 merges (ours and peft's) may differ in the last bit
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    res = cli("verify", out)
    assert res.code == 0, res.err
