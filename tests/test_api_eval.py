"""The measuring commands as Python functions: each ``to_json()`` is exactly the document the
command prints with ``--json`` (timings aside), and bad input raises a ``QKRestoreError``.

Each pair runs the command through the CLI entry point and the function through ``qkrestore``'s
public namespace on the same tiny models and options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_diagnostics import llama_pair, niah_model, q3n_pair, trio  # noqa: F401 - fixtures
from test_sweep import EXAMPLE, dense, one_thread  # noqa: F401 - fixtures

import qkrestore


def untimed(doc: Any) -> Any:
    """The document without wall-clock fields (``seconds``, ``prompts_seconds``), which differ
    between two runs."""
    if isinstance(doc, dict):
        return {k: untimed(v) for k, v in doc.items() if not k.endswith("seconds")}
    if isinstance(doc, list):
        return [untimed(v) for v in doc]
    return doc


def same(cli_out: str, result: Any) -> None:
    assert untimed(json.loads(cli_out)) == untimed(json.loads(json.dumps(result.to_json())))


def test_sweep_function_is_the_command(dense, cli) -> None:  # noqa: F811
    pre, post = dense
    res = cli(
        "sweep", pre, post, "--candidates", "pre,post,restore,single", "--lengths", "128",
        "--samples", "2", "--task", "single-1", "--reasoning", "example", "--device", "cpu",
        "--json", "--quiet",
    )  # fmt: skip
    assert res.code == 0, res.err
    got = qkrestore.sweep(
        pre,
        post,
        candidates="pre,post,restore,single",
        lengths=[128],
        samples=2,
        task="single-1",
        reasoning="example",
        device="cpu",
    )
    same(res.out, got)
    assert [r["name"] for r in got.candidates][:3] == ["pre", "post", "qk-restore"]
    assert got.pick["rule"] == "max recall with reasoning >= 0.95 * POST"
    assert set(got.probe) == {"decides", "reasons"}


def test_select_layers_function_is_the_command(dense, cli) -> None:  # noqa: F811
    _, post = dense
    res = cli("select-layers", post, "--recall", EXAMPLE, "--device", "cpu", "--json", "-q")
    assert res.code == 0, res.err
    got = qkrestore.select_layers(post, recall=EXAMPLE, device="cpu")
    same(res.out, got)
    drops = [r["drop"] for r in got.ranking]
    assert drops == sorted(drops, reverse=True) and [r["rank"] for r in got.ranking] == [1, 2, 3]
    assert got["retrieval"] == "recall-file" and len(got.ranking) == 3


def test_drift_function_is_the_command(llama_pair, cli) -> None:  # noqa: F811
    pre, post = llama_pair
    res = cli("drift", pre, post, "--json")
    assert res.code == 0, res.err
    same(res.out, qkrestore.drift(pre, post))


def test_attn_distance_function_is_the_command(trio, cli) -> None:  # noqa: F811
    res = cli("attn-distance", *trio, "--length", "96", "--device", "cpu", "--json")
    assert res.code == 0, res.err
    same(res.out, qkrestore.attn_distance(*trio, length=96, device="cpu"))
    with pytest.raises(qkrestore.QKRestoreError, match="--layer and --head go together"):
        qkrestore.attn_distance(*trio, length=96, layer=1)


def test_autocorr_function_is_the_command(tmp_path: Path, cli) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(3, 400))
    np.save(tmp_path / "ids.npy", ids)
    res = cli("autocorr", tmp_path / "ids.npy", "--max-distance", "20", "--json")
    assert res.code == 0, res.err
    got = qkrestore.autocorr(tmp_path / "ids.npy", max_distance=20)
    same(res.out, got)
    with pytest.raises(qkrestore.QKRestoreError, match="--input-kind"):
        qkrestore.autocorr(tmp_path / "ids.npy", input_kind="words")


def test_niah_function_is_the_command(niah_model, cli) -> None:  # noqa: F811
    res = cli("niah", niah_model, "--lengths", "128", "--samples", "2", "--device", "cpu", "--json")
    assert res.code == 0, res.err
    same(res.out, qkrestore.niah(niah_model, lengths=[128], samples=2, device="cpu"))
    with pytest.raises(qkrestore.QKRestoreError, match="at least 64 tokens"):
        qkrestore.niah(niah_model, lengths=[8])


def test_attn_locality_function_is_the_command(niah_model, cli) -> None:  # noqa: F811
    """``attn-locality --json`` prints what ``qkrestore.attn_locality`` returns; bad input is a
    typed error before any model runs."""
    args = ("--length", "128", "--samples", "1", "--last-k", "16", "--device", "cpu", "--json")
    res = cli("attn-locality", niah_model, *args)
    assert res.code == 0, res.err
    got = qkrestore.attn_locality([niah_model], length=128, samples=1, last_k=16, device="cpu")
    same(res.out, got)
    assert len(got.to_json()["prompts"]) == 1
    with pytest.raises(qkrestore.QKRestoreError, match="not a model folder"):
        qkrestore.attn_locality([Path(niah_model) / "nope"])


def test_sweep_errors_are_typed(dense, tmp_path: Path) -> None:  # noqa: F811
    pre, post = dense
    with pytest.raises(qkrestore.QKRestoreError, match="--candidates"):
        qkrestore.sweep(pre, post, candidates="pro,magic")
    with pytest.raises(qkrestore.QKRestoreError, match="not a local model folder"):
        qkrestore.sweep(pre, tmp_path / "nope", lengths=[128])
    with pytest.raises(qkrestore.QKRestoreError, match="--top 9: the model has only 3"):
        qkrestore.select_layers(post, recall=EXAMPLE, top=9, device="cpu")


def test_public_names_stay_functions() -> None:
    """Importing the modules behind ``sweep``/``select_layers`` must not shadow the functions."""
    import qkrestore.evaluate.select_layers as _  # noqa: F401
    from qkrestore.evaluate.sweep import run_sweep  # noqa: F401

    assert callable(qkrestore.sweep) and qkrestore.sweep.__module__ == "qkrestore.api_eval"
    assert qkrestore.select_layers.__module__ == "qkrestore.api_eval"


def test_inspect_layers_takes_adapters(tmp_path: Path, cli) -> None:
    """``inspect_layers(ADAPTER, base=PRE)`` is ``inspect-layers ADAPTER --base PRE --json``."""
    pytest.importorskip("peft")
    from lora_fixtures import build_adapter, build_base

    pre = build_base(tmp_path, "llama", {"num_hidden_layers": 2, "head_dim": 8})
    adapter = build_adapter(pre, tmp_path / "lora", r=2, target_modules=["q_proj", "v_proj"])
    res = cli("inspect-layers", adapter, "--base", pre, "--json")
    assert res.code == 0, res.err
    got = qkrestore.inspect_layers(adapter, base=pre)
    same(res.out, got)
    doc = got.to_json()
    assert doc["global_layers"] == [0, 1]
    assert {m["action"] for m in doc["modules"] if "q_proj" in m["module"]} == {"drop"}
    with pytest.raises(qkrestore.PlanError, match="not a PEFT adapter"):
        qkrestore.inspect_layers(pre, base=pre)
