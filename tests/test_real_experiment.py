"""The real-model experiment's script (scripts/reproduce/real/) end to end on a toy model, and the
interval arithmetic of its report against direct formulas.

The end-to-end test runs SFT, qkrestore's sweep and select-layers on a tiny random Llama with a
word-level tokenizer and a chat template (scripts/reproduce/real/toy.py); it checks the files, the
report's rows and that every interval holds its estimate, not the effect (a toy learns nothing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "scripts" / "reproduce" / "real"


def module(name: str, path: Path) -> ModuleType:
    """A script loaded by path under its own name (scripts/reproduce/ has a run.py of its own)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


paired = module("paired", REPO / "scripts" / "reproduce" / "paired.py")
report = module("real_report", REAL / "report.py")
real_run = module("real_run", REAL / "run.py")
toy = module("real_toy", REAL / "toy.py")

CANDS = ["qk-restore", "restore-q", "restore-k", "restore-v", "pro-key-r0.1", "pro-key-r1"]


def test_real_experiment_toy_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = toy.build(tmp_path / "model")
    out = tmp_path / "out"
    common = [
        "--model", str(model), "--steps", "2", "--problems-per-step", "6", "--pack-len", "200",
        "--lengths", "160,256", "--samples", "2", "--reasoning", "3", "--lrs", "1e-3,1e-2",
        "--seeds", "0", "--arms", "short,packed", "--top-k", "2", "--select-lengths", "160",
        "--select-samples", "2", "--device", "cpu", "--work", str(tmp_path / "w"),
    ]  # fmt: skip
    assert real_run.main([*common, "--out", str(out), "--plan-only", "--shard", "1/2"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["runs"] == 2 and est["candidates_per_run"] == 8
    assert est["selected_runs"] == ["short-lr0.001-s0", "packed-lr0.001-s0"]
    assert est["eval_forward_tokens"] > 0 and est["sft_tokens"] > 0
    assert not out.exists(), "--plan-only must write nothing"

    for part in ("1/2", "2/2"):
        assert real_run.main([*common, "--out", str(out / part[0]), "--shard", part]) == 0
    assert (out / "1" / "pre.json").is_file() and (out / "1" / "select.json").is_file()
    assert len(list(out.glob("*/run-*.json"))) == 4
    one = json.loads((out / "2" / "run-packed-lr0.01-s0.json").read_text())
    assert sorted(one["candidates"]) == sorted(["post", *CANDS, "qk-restore-top2"])
    for c in one["candidates"].values():
        assert sorted(c["niah"]) == ["single-2/160", "single-2/256"]
        assert all(len(v) == 2 and set(v) <= {"0", "1"} for v in c["niah"].values())
        assert len(c["reasoning"]) == 3
    assert one["candidates"]["qk-restore-top2"]["planned_layers"] == one["top_layers"]
    assert len(one["top_layers"]) == 2
    assert one["sft"]["steps"] == 2 and one["sft"]["target_tokens"] > 0
    for k in ("sft_s", "save_s", "sweep_s", "topk_s", "total_s"):
        assert one["phases"][k] >= 0
    assert "packed-lr0.01-s0: done" in (out / "2" / "log.txt").read_text()
    assert not list((tmp_path / "w").glob("post-*")), "POST checkpoints are removed after a run"

    assert report.main([str(out / "1"), str(out / "2"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 10_000
    table = md.split("## Candidate − +SFT, across runs")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith(("| short", "| packed"))]
    want = [report.label(n) for n in [*CANDS, "qk-restore-top2"]]
    for arm in ("short", "packed"):
        got = [r.split(" | ")[1] for r in rows if r.startswith(f"| {arm} (all lr)")]
        assert got == want
        assert sum(r.startswith(f"| {arm}, lr ") for r in rows) == 2 * len(want)
    doc = json.loads((out / "report.json").read_text())
    assert doc["metrics"] == ["niah", "niah@160", "niah@256", "reasoning"]
    assert len(doc["across"]) == 6 * 7 * 4  # groups (2 arms, 4 arm x lr) x candidates x metrics
    assert len(doc["items"]) == 4 * 7 * 4  # runs x candidates x metrics
    for row in doc["across"] + doc["items"] + doc["damage"] + doc["arms"]:
        if row["lo"] is None:  # one run (an arm x lr group here): a difference, no interval
            assert row["n"] == 1 and row["hi"] is None
            continue
        assert row["lo"] <= row["estimate"] <= row["hi"], row
    assert sum(r["lo"] is not None for r in doc["across"]) == 2 * 7 * 4
    assert "## What is and is not established" in md and "| - | PRE |" in md


# -- interval arithmetic against direct formulas --------------------------------------------------


def test_t_interval_matches_direct_formula() -> None:
    d = [0.10, 0.02, 0.07, -0.01]
    iv = paired.t_interval(d)
    m = sum(d) / 4
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 3)
    half = 3.182 * s / 2  # t_{0.975, 3} = 3.182
    assert iv.estimate == pytest.approx(0.045)
    assert (iv.lo, iv.hi) == (pytest.approx(m - half), pytest.approx(m + half))
    assert (iv.n, iv.wins, iv.losses) == (4, 3, 1)
    one = paired.t_interval([0.3])
    assert one.lo is None and one.hi is None and one.text() == "+30.0 [n=1]"


def test_t_quantiles() -> None:
    assert paired.t975(2) == 4.303 and paired.t975(30) == 2.042
    assert paired.t975(1000) == pytest.approx(1.960, abs=0.003)
    assert 2.021 > paired.t975(50) > 2.000
    with pytest.raises(ValueError):
        paired.t975(0)


def test_paired_items_agresti_min_and_mcnemar() -> None:
    # 20 items: 6 right only for the candidate, 2 right only for the base, 9 both, 3 neither
    cand = [1] * 6 + [0] * 2 + [1] * 9 + [0] * 3
    base = [0] * 6 + [1] * 2 + [1] * 9 + [0] * 3
    iv = paired.paired_items(cand, base)
    assert iv.estimate == pytest.approx(4 / 20)
    bt, ct, nt = 6.5, 2.5, 22.0
    dt = (bt - ct) / nt
    # Var = ((b + c)/n - ((b - c)/n)^2)/n on the adjusted cells
    h = 1.959964 * math.sqrt(((bt + ct) / nt - ((bt - ct) / nt) ** 2) / nt)
    assert (iv.lo, iv.hi) == (pytest.approx(dt - h), pytest.approx(dt + h))
    # McNemar exact: 2 * P[Bin(8, 1/2) <= 2] = 2 * (1 + 8 + 28) / 256
    assert iv.p == pytest.approx(2 * 37 / 256)
    assert (iv.wins, iv.losses) == (6, 2)
    same = paired.paired_items([1, 0, 1], [1, 0, 1])
    assert same.estimate == 0 and same.p == 1.0 and same.lo < 0 < same.hi
    with pytest.raises(ValueError):
        paired.paired_items([1], [1, 0])


def test_report_contrasts_from_known_outcomes() -> None:
    """Two runs of one arm with hand-set outcomes: the across-runs row is the t-interval of the two
    per-run differences, the per-run row the paired interval of the items."""

    def cand(niah: str, reasoning: str) -> dict:
        return {"niah": {"single-2/1024": niah}, "reasoning": reasoning}

    runs = [
        {"name": "short-a", "arm": "short", "lr": 1e-4, "seed": 0,
         "candidates": {"post": cand("0011", "10"), "qk-restore": cand("1111", "00")}},
        {"name": "short-b", "arm": "short", "lr": 1e-4, "seed": 1,
         "candidates": {"post": cand("0111", "11"), "qk-restore": cand("0111", "10")}},
    ]  # fmt: skip
    pre = {"candidates": {"pre": cand("1111", "00")}}
    doc = report.contrasts(runs, pre)
    row = next(r for r in doc["across"] if r["candidate"] == "qk-restore" and r["metric"] == "niah")
    want = paired.t_interval([0.5, 0.0])
    assert (row["estimate"], row["lo"], row["hi"]) == (want.estimate, want.lo, want.hi)
    assert row["estimate"] == 0.25 and row["hi"] == pytest.approx(0.25 + 12.706 * 0.25)
    reas = next(
        r for r in doc["across"] if r["candidate"] == "qk-restore" and r["metric"] == "reasoning"
    )
    assert reas["estimate"] == pytest.approx(-0.5)
    item = next(r for r in doc["items"] if r["run"] == "short-a" and r["metric"] == "niah")
    assert item["estimate"] == 0.5 and item["wins"] == 2 and item["losses"] == 0
    dmg = next(r for r in doc["damage"] if r["metric"] == "niah")
    assert dmg["estimate"] == pytest.approx((-0.5 - 0.25) / 2)


def test_grid_order_and_shards() -> None:
    runs = real_run.run_grid(["short", "packed"], [5e-5, 2e-4], [0, 1, 2])
    assert len(runs) == 12 and runs[0]["name"] == "short-lr5e-05-s0"
    a, b = real_run.shard(runs, "1/2"), real_run.shard(runs, "2/2")
    assert a + b == runs and len(a) == 6
    assert {(r["arm"], r["lr"]) for r in a} == {(r["arm"], r["lr"]) for r in runs}
