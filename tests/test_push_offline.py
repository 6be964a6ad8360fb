"""``push`` and ``--push-to-hub`` where the Hub cannot be used: no login, no route, offline mode.

Each run is a real ``python -m qkrestore`` against huggingface_hub itself, with ``HF_ENDPOINT`` at a
closed local port (127.0.0.1:9, nothing listens there) and ``HF_HOME`` in a temporary folder, so no
test reaches the network and none depends on this machine's saved token. The promises: one line,
exit 2 (1 when OUT fails verification), the line says OUT is intact and how to retry, OUT's bytes
are unchanged, and a run that cannot push refuses before it writes anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub import make_models


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkrestore", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def no_hub_env(tmp: Path, token: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "HUGGINGFACE_HUB_CACHE"
    }
    env.update(HF_HOME=str(tmp / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", COLUMNS="200")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return make_models(tmp_path)


@pytest.fixture
def out(models: tuple[Path, Path], tmp_path: Path, cli) -> Path:
    pre, post = models
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "-q").code == 0
    return out


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "internal error" not in lines[0] and "Traceback" not in res.stderr
    return lines[0]


def test_push_without_login_refuses_before_any_network_call(out: Path, tmp_path: Path) -> None:
    before = folder_bytes(out)
    res = run("push", out, "me/model", env=no_hub_env(tmp_path, token=None))
    assert res.returncode == 2
    line = one_error_line(res)
    assert "not logged in" in line and "hf auth login" in line
    assert f"{out} is written and intact" in line and f"qkrestore push {out} me/model" in line
    assert "127.0.0.1" not in line  # refused before trying the endpoint
    assert folder_bytes(out) == before


def test_push_with_no_route_says_what_failed_and_how_to_retry(out: Path, tmp_path: Path) -> None:
    before = folder_bytes(out)
    res = run("push", out, "me/model", env=no_hub_env(tmp_path, token="hf_not_a_real_token"))
    assert res.returncode == 2
    line = one_error_line(res)
    assert "me/model: upload to http://127.0.0.1:9 failed" in line
    assert f"qkrestore push {out} me/model" in line
    assert folder_bytes(out) == before


def test_push_in_offline_mode_names_the_variable(out: Path, tmp_path: Path) -> None:
    env = no_hub_env(tmp_path, token="hf_not_a_real_token") | {"HF_HUB_OFFLINE": "1"}
    res = run("push", out, "me/model", env=env)
    assert res.returncode == 2
    assert "HF_HUB_OFFLINE is set" in one_error_line(res)


def test_push_verifies_out_before_uploading_it(out: Path, tmp_path: Path) -> None:
    """A restored row changed after the write: the push stops at verification (exit 1), naming
    the tensor, before it tries the (closed) endpoint."""
    from safetensors.torch import load_file, save_file

    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if "q_proj" in n or "k_proj" in n)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    res = run("push", out, "me/model", env=no_hub_env(tmp_path, token="hf_not_a_real_token"))
    assert res.returncode == 1, res.stderr
    line = one_error_line(res)
    assert "not pushed, verification failed" in line and "127.0.0.1" not in line


def test_push_to_hub_without_login_writes_nothing(models, tmp_path: Path) -> None:
    pre, post = models
    out = tmp_path / "new-out"
    res = run(
        "merge", pre, post, "-o", out, "--push-to-hub", "me/model",
        env=no_hub_env(tmp_path, token=None),
    )  # fmt: skip
    assert res.returncode == 2
    line = one_error_line(res)
    assert "--push-to-hub me/model: not logged in" in line
    assert not out.exists()


def test_push_to_hub_with_no_route_keeps_a_verified_out(models, tmp_path: Path) -> None:
    pre, post = models
    out = tmp_path / "new-out"
    env = no_hub_env(tmp_path, token="hf_not_a_real_token")
    res = run("merge", pre, post, "-o", out, "--push-to-hub", "me/model", "-q", env=env)
    assert res.returncode == 2
    line = one_error_line(res)
    assert "upload to http://127.0.0.1:9 failed" in line
    assert f"{out} is written and intact" in line and f"qkrestore push {out} me/model" in line
    verify = run("verify", out, "--forward", "never", env=env)
    assert verify.returncode == 0, verify.stderr
