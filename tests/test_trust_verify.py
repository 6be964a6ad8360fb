"""Issue 14 point 2: ``verify`` checks the model as transformers loads it, not only the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_hf_pair, load_all
from safetensors.torch import save_file

from qkrestore.io.checkpoint import Checkpoint
from qkrestore.io.runtime import quiet_transformers
from qkrestore.surgery.plan import RestorePlan
from qkrestore.surgery.verification import check_loaded, read_provenance

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


@pytest.fixture
def merged(tmp_path: Path, cli) -> tuple[Path, Path, Path]:
    pre, post = build_hf_pair(tmp_path, "llama", {"num_hidden_layers": 2}, seed=11)
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    assert (out / INDEX).is_file() and not (out / SINGLE).exists()
    return pre, post, out


def test_loaded_parameters_are_compared_with_the_plan(merged, cli) -> None:
    _, _, out = merged
    res = cli("verify", out, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    loaded = report["forward"]["loaded"]
    planned = len(RestorePlan.from_json(read_provenance(out)["plan"]).patches)
    assert planned == 4  # q and k of two layers
    assert loaded["planned_compared"] == planned and loaded["not_compared"] == []
    assert loaded["others_compared"] > 0


@pytest.mark.parametrize("forward", ["never", "auto"])
def test_a_stale_single_file_the_loader_prefers_fails_verify(merged, cli, forward: str) -> None:
    _, post, out = merged
    post_t, _ = load_all(post)  # POST's routing: what a stale copy would hold
    save_file(post_t, str(out / SINGLE), metadata={"format": "pt"})
    res = cli("verify", out, "--forward", forward)
    assert res.code == 1, res.err
    assert SINGLE in res.err and "transformers loads this file" in res.err


def test_a_stray_weight_file_in_out_fails_verify(merged, cli) -> None:
    _, post, out = merged
    tensors, _ = load_all(post)
    save_file(tensors, str(out / "model.fp16.safetensors"), metadata={"format": "pt"})
    res = cli("verify", out, "--forward", "never")
    assert res.code == 1, res.err
    assert "model.fp16.safetensors" in res.err and "outside the restored set" in res.err


def test_a_model_holding_posts_routing_fails_the_loaded_check(merged) -> None:
    """The comparison itself, on a real module that holds the wrong weights: POST as loaded."""
    from transformers import AutoModelForCausalLM

    pre, post, out = merged
    quiet_transformers()
    plan = RestorePlan.from_json(read_provenance(out)["plan"])
    with Checkpoint.open(out) as got, Checkpoint.open(pre) as p, Checkpoint.open(post) as q:
        wrong = AutoModelForCausalLM.from_pretrained(post, dtype=torch.float32)
        found, summary = check_loaded(wrong, plan, got, p, q)
        assert not summary["ok"]
        assert sorted(m.tensor for m in found) == sorted(x.name for x in plan.patches)
        right = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        found, summary = check_loaded(right, plan, got, p, q)
        assert found == [] and summary["planned_compared"] == len(plan.patches)
