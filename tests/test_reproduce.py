"""The reproduction pipeline (scripts/reproduce/run.py) end to end at toy size on the CPU.

Checks that pre-training, CoT-SFT, the real `qkrestore merge` / `pro` / `drift` CLI calls, the
evaluation and the report all run and produce their files; it does not check the effect itself
(a toy model trained for a few seconds learns neither recall nor the arithmetic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "reproduce" / "run.py"


def test_reproduce_toy_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), "--size", "toy", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]

    for name in ("report.md", "results.json", "recall.png", "drift.png", "drift.json", "log.txt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    expected = {
        "PRE", "+SFT", "+QK-Restore", "+QK-Pro (R=0.1)", "+QK-Pro (R=1)",
        "+SFT-long", "+SFT-long +QK-Restore", "+SFT-long +QK-Pro (R=1)",
    }  # fmt: skip
    assert set(results["models"]) == expected
    for m in results["models"].values():
        assert set(m["recall"]) == {"48", "96"}
        assert all(0.0 <= v <= 1.0 for v in m["recall"].values())
        assert 0.0 <= m["reasoning"]["answer"] <= 1.0
    assert "full_attention" in results["layer_types"]
    assert results["drift"]["layers"], "drift found no softmax layer"

    # QK-Restore output really is POST with PRE's routing rows (checked by the tool itself)
    ckpt = out / "ckpt"
    assert (ckpt / "qkrestore" / "qkrestore.json").is_file()
    verify = subprocess.run(
        [sys.executable, "-m", "qkrestore", "verify", str(ckpt / "qkrestore")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-2000:]

    report = (out / "report.md").read_text()
    assert "| PRE |" in report and "+QK-Restore" in report and "qkrestore merge" in report
