"""The analog's packed-SFT arm (``run.py --sft-packing N``): the packing itself, exactly, and a toy
run with it on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "reproduce"


def module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


data = module("reproduce_data", SCRIPTS / "data.py")


def test_pack_batch_keeps_examples_order_and_loss_mask() -> None:
    rng = np.random.default_rng(0)
    ids, labels = data.cot_batch(rng, 5, 3, 6)
    packed_ids, packed_labels = data.pack_batch(ids, labels, 48)
    real = ids != data.PAD
    n = int(real.sum())
    assert n > 48 and packed_ids.shape == (-(-n // 48), 48)
    flat, flat_lab = packed_ids.reshape(-1), packed_labels.reshape(-1)
    # the same tokens and labels, row after row, then padding with no loss
    assert flat[:n].tolist() == ids[real].tolist()
    assert flat_lab[:n].tolist() == labels[real].tolist()
    assert (flat[n:] == data.PAD).all() and (flat_lab[n:] == -100).all()
    assert (packed_labels != -100).sum() == (labels != -100).sum()
    # sequences now hold several examples: BOS opens each, more than one per row
    assert (packed_ids[0] == data.BOS).sum() > 1
    with pytest.raises(ValueError):
        data.pack_batch(ids, labels, 0)


def test_toy_run_with_sft_packing(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "packed"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "run.py"), "--out", str(out), "--size", "toy",
         "--setup", "analog", "--device", "cpu", "--sft-packing", "96", "--also-targets", "none",
         "--no-qk-frozen", "--no-ablate", "--pre-steps", "10", "--sft-steps", "8"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["sft_packing"] == 96
    assert results["config"]["sft_steps"] == 8 and results["sft"]["steps"] == 8
    assert {"PRE", "+SFT", "+QK-Restore"} <= set(results["models"])
