"""Every recipe ``sweep`` can write for a PEFT adapter POST is accepted by the command its own
comment names (issue 22, class 5): ``qkrestore merge|pro PRE ADAPTER -o OUT --config RECIPE``
exits 0. QK-Pro's cross-gram form has no low-rank solution, so its recipe asks for a merged
output (``merge_adapter: true``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_sweep_adapter import models  # noqa: F401 - fixture

from qkrestore.evaluate.sweep import SweepConfig, base_candidates, recipe_text, top_k_candidates

pytest.importorskip("peft")


def kinds() -> list:
    cfg = SweepConfig(ridges=(1.0,))
    cands = [c for c in base_candidates([0, 1], cfg) if c.kind in ("restore", "pro")]
    return cands + top_k_candidates([1, 0, 2], (2,))


def runs(cand) -> object:
    return pytest.param(cand, id=cand.name)


@pytest.mark.parametrize("cand", kinds(), ids=lambda c: c.name)
def test_adapter_pick_recipes_ask_for_what_the_command_accepts(cand) -> None:
    """A cross-gram pick on an adapter asks for a merged output; every other pick stays an
    adapter (merge/pro on adapters write adapters by default)."""
    layers = list(cand.layers) if cand.layers is not None else [0, 1]
    text = recipe_text(cand, layers, False, "why", post_is_adapter=True)
    keys = yaml.safe_load(text)
    assert command_of(text) == ("pro" if cand.kind == "pro" else "merge")
    assert keys.get("merge_adapter", False) is (cand.form == "cross-gram")
    assert keys["layers"] == layers
    plain = yaml.safe_load(recipe_text(cand, layers, False, "why"))  # a checkpoint POST
    assert "merge_adapter" not in plain


def command_of(text: str) -> str:
    m = re.search(r"^# use: qkrestore (merge|pro) PRE POST -o OUT --config THIS_FILE$", text, re.M)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize("cand", [runs(c) for c in kinds()])
def test_every_pick_recipe_runs_on_the_adapter(models, tmp_path: Path, cli, cand) -> None:  # noqa: F811
    pre, adapter, _ = models
    layers = list(cand.layers) if cand.layers is not None else [0, 1]
    text = recipe_text(cand, layers, False, f"candidate '{cand.name}'", post_is_adapter=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    cmd = command_of(text)
    res = cli(cmd, pre, adapter, "-o", tmp_path / "out", "--config", recipe, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["layers"] == layers


def test_swept_cross_gram_pick_runs_on_the_adapter(models, tmp_path: Path, cli) -> None:  # noqa: F811
    """The issue's own case: sweep an adapter, pick the cross-gram candidate, run its recipe."""
    pre, adapter, _ = models
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": [5, 9, 14, 22], "answer": [7, 40]}) + "\n")
    recipe = tmp_path / "pick.yaml"
    res = cli(
        "sweep", pre, adapter, "--candidates", "cross-gram", "--fix", "key", "--recall", items,
        "--reasoning", items, "--reasoning-metric", "loglik", "--pick", "max loglik",
        "--write-recipe", recipe, "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert res.code == 0, res.err
    text = recipe.read_text()
    assert command_of(text) == "pro" and yaml.safe_load(text)["merge_adapter"] is True
    out = cli("pro", pre, adapter, "-o", tmp_path / "out", "--config", recipe)
    assert out.code == 0, out.err
