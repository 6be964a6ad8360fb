"""Adapter repos on the Hub as POST (through a populated, offline HF cache), and --push-to-hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import sha
from lora_fixtures import DENSE, build_adapter, build_base
from test_hub import cache_repo, run

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    pre = build_base(tmp_path, "qwen3", DENSE)
    adapter = build_adapter(pre, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=QKVO)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"  # as a Hub-trained adapter says
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return pre, adapter


def test_adapter_repo_as_post(pair, tmp_path: Path) -> None:
    pre, adapter = pair
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/base", pre)
    cache_repo(cache, "org/lora", adapter)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", COLUMNS="200")
    hub_out, local_out = tmp_path / "hub-out", tmp_path / "local-out"
    res = run("merge", "org/base", "hf://org/lora", "-o", str(hub_out), "--json", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["sources"]["post"]["source"] == "org/lora" and doc["output_kind"] == "adapter"
    res = run("merge", str(pre), str(adapter), "-o", str(local_out), env=env)
    assert res.returncode == 0, res.stderr
    assert "cannot be compared" in res.stderr  # a Hub id against a local PRE: told, not refused
    assert sha(hub_out / "adapter_model.safetensors") == sha(
        local_out / "adapter_model.safetensors"
    )
    assert sha(hub_out / "adapter_config.json") == sha(local_out / "adapter_config.json")
    meta = yaml.safe_load((hub_out / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft"

    # An adapter trained on another Hub base is refused.
    cache_repo(cache, "org/other", pre)
    res = run("merge", "org/other", "org/lora", "-o", str(tmp_path / "x"), env=env)
    assert res.returncode == 2 and "org/base" in res.stderr and not (tmp_path / "x").exists()


def test_push_adapter_output(pair, tmp_path: Path, monkeypatch, cli) -> None:
    """The upload goes through huggingface_hub's HfApi (replaced here: no network in tests)."""
    import huggingface_hub

    pre, adapter = pair
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the login is checked before any work
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    res = cli("merge", pre, adapter, "-o", out, "--push-to-hub", "me/lora-qkrestore", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["pushed"] == "https://hub/commit/1"
    assert calls[0][1]["repo_id"] == "me/lora-qkrestore"
    uploaded = Path(calls[1][1]["folder_path"])
    assert uploaded == out and (uploaded / "adapter_config.json").is_file()
    assert not (uploaded / "config.json").exists()  # an adapter repo, not a model repo
