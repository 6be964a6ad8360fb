"""Shared fixtures: tiny random checkpoints built offline, and an independent byte-level oracle.

Nothing here imports qkrestore's planning code: the expected routing rows are derived in the tests
from transformers' own configs (or from the hand-written remote-code configs), so the tests check the
tool against a second, independent reading of each family.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qkrestore.cli import main
from qkrestore.io.runtime import quiet_transformers
from qkrestore.testing.tiny import FULL, LIN, QWEN3_NEXT, TINY, build_pair

# Re-exported for the test modules (``from conftest import ...``).
__all__ = ["FULL", "LIN", "QWEN3_NEXT", "TINY", "build_hf_pair", "quiet_transformers"]

build_hf_pair = build_pair  # the same tiny models the demo shows
QWEN3_5_TEXT = {
    k: v
    for k, v in QWEN3_NEXT.items()
    if k
    not in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "layer_types",
    )
} | {"full_attention_interval": 2}


def write_checkpoint(
    root: Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A checkpoint written by hand (remote-code families), optionally split into shards."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    meta = metadata or {"format": "pt"}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata=meta)
        return root
    weight_map = {}
    per = -(-len(names) // shards)
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(root / file), metadata=meta)
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return root


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in tensors.items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
        out[n] = (t.float() + noise).to(t.dtype) if t.is_floating_point() else t.clone()
    return out


# -- reading back, independently of qkrestore ----------------------------------------------------


def load_all(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict | None]]:
    """All tensors of a folder with the safetensors library, and each shard's metadata."""
    tensors, metas = {}, {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            metas[f.name] = fh.metadata()
            for n in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[n] = fh.get_tensor(n)
    return tensors, metas


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_merged(
    out: Path,
    pre: Path,
    post: Path,
    expected: dict[str, list[tuple[int, int]]],
    cast: bool = False,
) -> None:
    """Every tensor is POST's byte for byte, except the expected rows, which are PRE's."""
    got, got_meta = load_all(out)
    pre_t, _ = load_all(pre)
    post_t, post_meta = load_all(post)
    assert set(got) == set(post_t)
    assert got_meta == post_meta
    assert set(expected) <= set(got), sorted(set(expected) - set(got))
    for name, t in got.items():
        p = post_t[name]
        assert t.dtype == p.dtype and t.shape == p.shape, name
        if name not in expected:
            assert raw(t) == raw(p), f"{name} should be POST's"
            continue
        taken = torch.zeros(t.shape[0] if t.dim() else 1, dtype=torch.bool)
        for r0, r1 in expected[name]:
            want = pre_t[name][r0:r1]
            if cast:
                want = want.to(p.dtype)
            assert raw(t[r0:r1]) == raw(want), f"{name}[{r0}:{r1}] should be PRE's"
            taken[r0:r1] = True
        keep = ~taken
        assert raw(t[keep]) == raw(p[keep]), (
            f"{name}: rows outside the routing set should be POST's"
        )
    # Non-weight files are POST's, byte for byte.
    for f in post.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "README.md":
            assert sha(out / f.name) == sha(f), f.name


def routing_rows(
    names: Iterable[str],
    layers: Iterable[int],
    prefix: str = "model.layers.",
    gated_heads: tuple[int, int] | None = None,
    targets: tuple[str, ...] = ("q", "k"),
) -> dict[str, list[tuple[int, int]]]:
    """The test's own statement of the routing set: W_Q, W_K, their biases and q/k norms.

    ``gated_heads=(H, hd)`` marks a Qwen3-Next-style q_proj whose rows alternate query/gate per head.
    """
    names = set(names)
    out: dict[str, list[tuple[int, int]]] = {}
    for i in layers:
        base = f"{prefix}{i}.self_attn."
        for t in targets:
            for suffix in (f"{t}_proj.weight", f"{t}_proj.bias", f"{t}_norm.weight"):
                name = base + suffix
                if name not in names:
                    continue
                if t == "q" and gated_heads and suffix != "q_norm.weight":
                    h, hd = gated_heads
                    out[name] = [(j * 2 * hd, j * 2 * hd + hd) for j in range(h)]
                else:
                    out[name] = [(0, 10**9)]
    return out


def resolve_rows(expected: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return {n: [(a, min(b, tensors[n].shape[0])) for a, b in rows] for n, rows in expected.items()}


# -- running the CLI in-process -----------------------------------------------------------------


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str | os.PathLike[str]) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


def leftovers(parent: Path) -> list[str]:
    """Temporary folders the writer may have left next to OUT."""
    return sorted(p.name for p in parent.iterdir() if ".qkrestore-" in p.name)
