"""Messages that say what is wrong and what to do: a Hub source that cannot be fetched (offline mode
or no route, told apart), the ``hf download`` hint in valid ``hf`` syntax, and a PEFT adapter folder
given where a model belongs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lora_fixtures import DENSE, build_adapter, build_base

from qkrestore.io.hub import Source, download_hint, parse_source


def run(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkrestore", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def empty_hub_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An empty HF cache and a Hub endpoint where nothing listens (127.0.0.1:9): no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", COLUMNS="200")
    return env | extra


def test_download_hint_is_valid_hf_syntax() -> None:
    """``hf download`` takes the revision as ``--revision`` (huggingface_hub's cli/download.py);
    ``org/name@rev`` is read as a repo id and fails."""
    assert download_hint(parse_source("org/sft@v2")) == (
        "download it first with 'hf download org/sft --revision v2'"
    )
    assert (
        download_hint(Source("org/sft", "org/sft"))
        == "download it first with 'hf download org/sft'"
    )


def test_offline_mode_and_no_route_are_told_apart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    offline = run(
        "merge", "org/base", "org/sft@v2", "-o", out,
        env=empty_hub_env(tmp_path, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert offline.returncode == 2
    assert "HF_HUB_OFFLINE is set" in offline.stderr and "127.0.0.1" not in offline.stderr
    assert "'hf download org/sft --revision v2'" in offline.stderr

    no_route = run("merge", "org/base", "org/sft@v2", "-o", out, env=empty_hub_env(tmp_path))
    assert no_route.returncode == 2
    assert "http://127.0.0.1:9 cannot be reached" in no_route.stderr
    assert "HF_HUB_OFFLINE" not in no_route.stderr  # it is not set: not the cause
    assert "'hf download org/sft --revision v2'" in no_route.stderr
    for res in (offline, no_route):
        assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapter")
    pre = build_base(root, "qwen3", DENSE)
    ad = build_adapter(pre, root / "adapter", target_modules=["q_proj", "v_proj"], r=4)
    (ad / "tokenizer_config.json").write_text("{}")  # adapters often carry a tokenizer
    return pre, ad


@pytest.mark.parametrize(
    "command",
    [
        ["select-layers", "{A}", "--lengths", "64"],
        ["drift", "{P}", "{A}"],
        ["drift", "{A}", "{P}"],
        ["niah", "{A}", "--lengths", "64"],
        ["attn-distance", "{A}", "--length", "64"],
    ],
    ids=["select-layers", "drift-post", "drift-pre", "niah", "attn-distance"],
)
def test_an_adapter_where_a_model_belongs_is_named(adapter, command: list[str], cli) -> None:
    pre, ad = adapter
    args = [a.replace("{A}", str(ad)).replace("{P}", str(pre)) for a in command]
    res = cli(*args)
    assert res.code == 2, res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    assert f"{ad}: a PEFT adapter (adapter_config.json, no config.json), not a model" in lines[0]
    assert f"pass its base model ({pre})" in lines[0]
    assert f"qkrestore merge BASE {ad} --merge-adapter -o MERGED" in lines[0]
    assert "missing" not in lines[0] and "tokenizer" not in lines[0]
