"""Hub ids as sources (through a populated, offline HF cache), uploads, model cards and recipes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_all, raw, sha, write_checkpoint
from test_handwritten_families import hypenet_config, model_tensors, perturbed

from qkrestore.io.checkpoint import Checkpoint
from qkrestore.io.hub import parse_source, pre_shards_needed
from qkrestore.surgery.plan import build_plan, pre_names_for

REPO = Path(__file__).resolve().parents[1]
SOFTMAX = [False, True, False, False, False, True]
CONFIG = {
    "model_type": "x",
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "layer_types": ["linear_attention" if not s else "full_attention" for s in SOFTMAX],
}


def make_models(tmp: Path) -> tuple[Path, Path]:
    t = model_tensors(SOFTMAX, False, seed=41)
    pre = write_checkpoint(tmp / "src-pre", CONFIG, t, shards=6)
    post = write_checkpoint(tmp / "src-post", CONFIG, perturbed(t, seed=42), shards=3)
    (post / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    return pre, post


def cache_repo(cache: Path, repo_id: str, folder: Path, only: set[str] | None = None) -> None:
    """Lay out ``folder`` as huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        if only is not None and f.name not in only:
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkrestore", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def hub_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    pre, post = make_models(tmp_path)
    cache = tmp_path / "hf" / "hub"
    # PRE's snapshot holds only the shards that the plan needs: the run must not want the others.
    with Checkpoint.open(pre) as pre_ck, Checkpoint.open(post) as post_ck:
        plan = build_plan(pre_ck, post_ck)
        index = json.loads((pre / "model.safetensors.index.json").read_text())["weight_map"]
        needed = set(pre_shards_needed(index, pre_names_for(plan, post_ck, index)))
    cache_repo(cache, "org/pre", pre, only={"config.json", "model.safetensors.index.json", *needed})
    cache_repo(cache, "org/post", post)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", COLUMNS="200")
    return env, pre, post


def test_merge_from_hub_ids_equals_local_merge(hub_env, tmp_path: Path) -> None:
    env, pre, post = hub_env
    hub_out, local_out = tmp_path / "hub-out", tmp_path / "local-out"
    res = run("merge", "org/pre", "hf://org/post", "-o", str(hub_out), "--json", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["sources"]["pre"]["source"] == "org/pre"
    res = run("merge", str(pre), str(post), "-o", str(local_out), "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    for f in post.iterdir():
        assert sha(hub_out / f.name) == sha(local_out / f.name), f.name
    card = (hub_out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["org/pre", "org/post"]
    res = run("verify", str(hub_out), env=env)
    assert res.returncode == 0, res.stderr


def test_pre_download_list_names_only_needed_shards(tmp_path: Path) -> None:
    pre, post = make_models(tmp_path)
    index = json.loads((pre / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(pre) as pre_ck, Checkpoint.open(post) as post_ck:
        plan = build_plan(pre_ck, post_ck)
        names = pre_names_for(plan, post_ck, index)
    want = sorted(
        {
            index[f"model.layers.{i}.self_attn.{p}.weight"]
            for i in (1, 5)
            for p in ("q_proj", "k_proj", "q_norm", "k_norm")
        }
    )
    assert pre_shards_needed(index, names) == want
    assert len(want) < len(set(index.values()))


def test_missing_repo_is_a_clear_error(hub_env, tmp_path: Path) -> None:
    env, _, _ = hub_env
    res = run("merge", "org/nothing-here", "org/post", "-o", str(tmp_path / "out"), env=env)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "org/nothing-here" in res.stderr and "cache" in res.stderr
    assert not (tmp_path / "out").exists()


def test_source_parsing() -> None:
    assert parse_source("org/name").repo_id == "org/name"
    s = parse_source("org/name@v1.0")
    assert (s.repo_id, s.revision) == ("org/name", "v1.0")
    assert parse_source("hf://org/name").repo_id == "org/name"
    assert parse_source("./org/name").repo_id is None
    assert parse_source("/abs/path").repo_id is None
    assert parse_source("single").repo_id is None


def test_model_card_parses_with_huggingface_hub(hub_env, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    env, _, _ = hub_env
    out = tmp_path / "out"
    assert run("merge", "org/pre", "org/post", "-o", str(out), "-q", env=env).returncode == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["org/pre", "org/post"]
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert "qk-restore" in data["tags"]
    assert "merge org/pre org/post" in card.text and "| 5 |" in card.text


def test_push_uploads_the_folder(pair_out, monkeypatch, cli) -> None:
    """The upload goes through huggingface_hub's HfApi (replaced here: no network in tests)."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the login is checked before any upload
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    res = cli("push", pair_out, "me/model", "--private", "--revision", "exp")
    assert res.code == 0, res.err
    assert calls[0] == (
        "create_repo",
        {"repo_id": "me/model", "private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert calls[1][0] == "create_branch" and calls[1][1]["branch"] == "exp"
    assert calls[2][1]["folder_path"] == str(pair_out) and calls[2][1]["revision"] == "exp"


@pytest.fixture
def pair_out(tmp_path: Path, cli) -> Path:
    pre, post = make_models(tmp_path)
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "-q").code == 0
    return out


def test_push_refuses_a_folder_not_made_by_qkrestore(tmp_path: Path, cli) -> None:
    res = cli("push", tmp_path, "me/model")
    assert res.code == 2 and "qkrestore.json" in res.err


# -- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe: Path) -> None:
    import typer

    from qkrestore.cli import app
    from qkrestore.surgery.recipes import load_recipe

    for name in ("merge", "pro"):
        cmd = typer.main.get_command(app).commands[name]
        params = [(p.name, getattr(p, "opts", [])) for p in cmd.params]
        loaded = load_recipe(recipe, params)
        assert loaded.get("layers", "auto") == "auto"
        if recipe.stem != "template":
            assert loaded["expect_layers"]


def hypenet_2b_pair(tmp: Path) -> tuple[Path, Path]:
    attn = {2, 3, 6, 8, 9, 21, 25}
    cfg = hypenet_config() | {
        "num_hidden_layers": 28,
        "mixer_types": ["attn" if i in attn else "lightning-attn" for i in range(28)],
    }
    t = model_tensors([i in attn for i in range(28)], False, seed=51)
    return write_checkpoint(tmp / "pre", cfg, t, shards=2), write_checkpoint(
        tmp / "post", cfg, perturbed(t, 52), shards=2
    )


def test_recipe_runs_and_checks_layers(tmp_path: Path, cli) -> None:
    pre, post = hypenet_2b_pair(tmp_path)
    res = cli(
        "merge",
        pre,
        post,
        "-o",
        tmp_path / "out",
        "--config",
        REPO / "configs/hypenet-2b.yaml",
        "--json",
    )
    assert res.code == 0, res.err
    assert json.loads(res.out)["layers"] == [2, 3, 6, 8, 9, 21, 25]
    res = cli(
        "merge", pre, post, "-o", tmp_path / "o2", "--config", REPO / "configs/hypenet-9b.yaml"
    )
    assert res.code == 2 and "expected softmax-attention layers" in res.err
    assert not (tmp_path / "o2").exists()
    # command-line options override the recipe
    res = cli(
        "merge",
        pre,
        post,
        "-o",
        tmp_path / "o3",
        "--config",
        REPO / "configs/hypenet-9b.yaml",
        "--expect-layers",
        "2,3,6,8,9,21,25",
        "--layers",
        "2,3,6,8,9,21,25",
        "--json",
    )
    assert res.code == 0, res.err
    res = cli(
        "pro", pre, post, "-o", tmp_path / "o4", "--config", REPO / "configs/hypenet-2b.yaml", "-q"
    )
    assert res.code == 0, res.err


def test_bad_recipe_key(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layerz: [1]\n")
    res = cli("merge", "a", "b", "-o", tmp_path / "out", "--config", recipe)
    assert res.code == 2 and "unknown recipe key 'layerz'" in res.err and len(res.err_lines) == 1
    recipe.write_text("- not a mapping\n")
    res = cli("merge", "a", "b", "-o", tmp_path / "out", "--config", recipe)
    assert res.code == 2 and "mapping" in res.err


# -- machine output -----------------------------------------------------------------------------


def test_json_of_every_command(pair_out: Path, tmp_path: Path, cli) -> None:
    record = json.loads((pair_out / ".cache" / "qkrestore" / "sources.json").read_text())
    pre, post = record["pre"], record["post"]
    docs = {
        "merge": cli("merge", pre, post, "-o", tmp_path / "m", "--json"),
        "pro": cli("pro", pre, post, "-o", tmp_path / "p", "--json"),
        "inspect-layers": cli("inspect-layers", post, "--json"),
        "verify": cli("verify", pair_out, "--json", "--forward", "never"),
    }
    fields = {
        "merge": {
            "ok",
            "method",
            "layers",
            "tensors",
            "restored_bytes",
            "plan",
            "output",
            "tensor_sha256",
            "bytes_read_from_pre",
        },
        "pro": {"ok", "method", "layers", "solve", "plan", "output", "tensor_sha256"},
        "inspect-layers": {
            "model_type",
            "adapter",
            "num_layers",
            "global_layers",
            "local_layers",
            "layers",
        },
        "verify": {"ok", "tensors_checked", "mismatches", "forward"},
    }
    for name, res in docs.items():
        assert res.code == 0, (name, res.err)
        doc = json.loads(res.out)
        assert fields[name] <= set(doc), (name, set(doc))
    got, _ = load_all(tmp_path / "m")
    assert raw(got["model.layers.1.self_attn.q_proj.weight"]) == raw(
        load_all(Path(pre))[0]["model.layers.1.self_attn.q_proj.weight"]
    )


def test_dry_run_lists_downloads_without_writing(hub_env, tmp_path: Path) -> None:
    env, pre, _ = hub_env
    res = run(
        "merge", "org/pre", "org/post", "-o", str(tmp_path / "out"), "--dry-run", "--json", env=env
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    index = json.loads((pre / "model.safetensors.index.json").read_text())["weight_map"]
    want = {
        index[f"model.layers.{i}.self_attn.{p}.weight"]
        for i in (1, 5)
        for p in ("q_proj", "k_proj", "q_norm", "k_norm")
    }
    pre_files = {f["file"] for f in doc["downloads"]["pre"]}
    assert pre_files == want | {"config.json", "model.safetensors.index.json"}
    assert all(f["size"] > 0 for f in doc["downloads"]["pre"])
    assert {f["file"] for f in doc["downloads"]["post"]} >= {"config.json", "tokenizer_config.json"}
    assert not (tmp_path / "out").exists()
