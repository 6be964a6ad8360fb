"""scripts/reproduce/aggregate.py's pooled paired contrasts (``--paired``) on hand-made runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

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


paired = module("paired", SCRIPTS / "paired.py")
aggregate = module("reproduce_aggregate", SCRIPTS / "aggregate.py")


def model(r128: float, r256: float, answer: float, trace: float) -> dict:
    return {"recall": {"128": r128, "256": r256}, "reasoning": {"answer": answer, "trace": trace}}


def run(sft: float, qk: float, q: float, v: float, located: float | None = None) -> dict:
    out = {
        "seed": 0,
        "config": {"lengths": [128, 256]},
        "models": {
            "+SFT": model(sft, sft / 2, 0.30, 0.10),
            "+QK-Restore": model(qk, qk / 2, 0.28, 0.05),
            "+Restore {q}": model(q, q / 2, 0.30, 0.10),
            "+Restore {v}": model(v, v / 2, 0.31, 0.10),
        },
    }
    if located is not None:
        out["located"] = {"+SFT": {"MLPs": {"recall": {"128": located, "256": located}}}}
    return out


def cells(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_paired_table_is_the_t_interval_of_per_run_differences(tmp_path: Path) -> None:
    runs = [run(0.5, 0.9, 0.6, 0.55, 1.0), run(0.8, 0.85, 0.8, 0.82), run(0.2, 0.6, 0.5, 0.25, 0.9)]
    md = "\n".join(aggregate.paired_table(runs))
    assert "pooled over 3 runs" in md
    qk = cells(md, "QK-Restore")
    want = paired.t_interval([0.4, 0.05, 0.4])
    assert qk[0] == f"{want.text()} (3/0)"  # recall@128
    assert qk[-1] == "3"  # n
    assert qk[3] == paired.t_interval([-0.02] * 3).text() + " (0/3)"  # CoT answer
    assert qk[4] == paired.t_interval([-0.05] * 3).text() + " (0/3)"  # CoT trace
    # Table 4's order as within-run differences: Q-Restore − V-Restore at 128 tokens
    qv = cells(md, "Q-Restore − V-Restore")
    assert qv[0] == paired.t_interval([0.05, -0.02, 0.25]).text() + " (2/1)"
    # --locate groups: only the runs that have them, recall only
    mlp = cells(md, "MLPs")
    assert mlp[0] == paired.t_interval([0.5, 0.7]).text() + " (2/0)"
    assert mlp[3] == "not measured" and mlp[-1] == "2"
    assert "| K-Restore |" not in md.split("#### Table 4")[0]  # not in these runs: no row

    for i, r in enumerate(runs):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(r))
    out = tmp_path / "agg"
    assert (
        aggregate.main(
            [*(str(tmp_path / f"r{i}") for i in range(3)), "--paired", "--out", str(out)]
        )
        == 0
    )
    assert (tmp_path / "agg.md").read_text().strip() == md.strip()


def test_paired_table_one_run_has_no_interval() -> None:
    md = "\n".join(aggregate.paired_table([run(0.5, 0.9, 0.6, 0.55)]))
    assert cells(md, "QK-Restore")[0] == "+40.0 [n=1] (1/0)"


@pytest.mark.parametrize("runs", [[{"seed": 0, "config": {"lengths": [128]}, "models": {}}]])
def test_paired_table_without_sft_is_empty(runs: list[dict]) -> None:
    assert aggregate.paired_table(runs) == []
