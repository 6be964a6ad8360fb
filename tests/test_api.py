"""The Python API (``qkrestore.merge/pro/verify/inspect_layers``), called directly, without the CLI.

Each call must write what the CLI writes for the same options, return the data ``--json`` prints,
and raise the tool's typed errors (never ``SystemExit``) on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    QWEN3_NEXT,
    assert_merged,
    build_hf_pair,
    load_all,
    resolve_rows,
    routing_rows,
    sha,
)

import qkrestore
from qkrestore import OutputError, PlanError, QKRestoreError


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("api"), "qwen3_next", QWEN3_NEXT)


def expected_rows(pre: Path) -> dict:
    tensors, _ = load_all(pre)
    return resolve_rows(routing_rows(tensors, [1, 3], gated_heads=(2, 16)), tensors)


def test_merge_writes_what_the_cli_writes(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    notes: list[str] = []
    result = qkrestore.merge(pre, post, tmp_path / "api", on_note=notes.append)
    assert isinstance(result, qkrestore.api.JobResult)
    assert result.plan.layers == [1, 3] and result.output == tmp_path / "api"
    assert_merged(tmp_path / "api", pre, post, expected_rows(pre))
    res = cli("merge", pre, post, "-o", tmp_path / "cli", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    # The same document as --json, less what names the output or the command.
    for key in ("method", "layers", "tensors", "restored_bytes", "touched_files", "plan"):
        assert result.to_json()[key] == doc[key], key
    assert result.to_json()["tensor_sha256"] == doc["tensor_sha256"]
    for f in post.glob("*.safetensors"):
        assert sha(tmp_path / "api" / f.name) == sha(tmp_path / "cli" / f.name), f.name
    record = json.loads((tmp_path / "api" / "qkrestore.json").read_text())
    assert record["command"] == "qkrestore.merge pre post api"


def test_merge_options_and_dry_run(pair, tmp_path: Path) -> None:
    pre, post = pair
    out = tmp_path / "dry"
    result = qkrestore.merge(pre, post, out, layers=[3], targets="q", dry_run=True)
    assert result.dry_run and not out.exists()
    assert result.plan.layers == [3] and {p.target for p in result.plan.patches} == {"q"}


def test_pro_and_verify(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    result = qkrestore.pro(pre, post, tmp_path / "api", fix="query", ridge=0.5, device="cpu")
    solve = result.summary["solve"]
    assert solve["device"] == "cpu" and solve["layers"] == 2 and solve["systems"] > 0
    res = cli("pro", pre, post, "-o", tmp_path / "cli", "--fix", "query", "--ridge", "0.5")
    assert res.code == 0, res.err
    for f in post.glob("*.safetensors"):
        assert sha(tmp_path / "api" / f.name) == sha(tmp_path / "cli" / f.name), f.name
    report = qkrestore.verify(tmp_path / "api", forward="never")
    assert report.ok and report.tensors_checked > 0 and report.to_json()["ok"] is True


def test_verify_reports_a_tampered_output(pair, tmp_path: Path) -> None:
    pre, post = pair
    out = tmp_path / "out"
    qkrestore.merge(pre, post, out)
    target = next(p for p in qkrestore.inspect_layers(out).layers[0]["tensors"])
    shard = out / target["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last tensor of the shard, whichever it is
    shard.write_bytes(bytes(data))
    report = qkrestore.verify(out, forward="never")
    assert not report.ok and report.mismatches[0].file == target["file"]


def test_inspect_layers(pair) -> None:
    pre, post = pair
    report = qkrestore.inspect_layers(post, compare_with=pre)
    assert report.model_type == "qwen3_next" and report.global_layers == [1, 3]
    assert [layer["layer"] for layer in report.layers] == [1, 3]
    drift = report.to_json()["compare"]["layers"]
    assert [row["layer"] for row in drift] == [1, 3] and all(row["q"] > 0 for row in drift)


def test_errors_are_typed_not_exits(pair, tmp_path: Path) -> None:
    pre, post = pair
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        qkrestore.merge(pre, post, tmp_path / "taken")
    with pytest.raises(PlanError, match="ridge"):
        qkrestore.pro(pre, post, tmp_path / "x", ridge=-1.0)
    with pytest.raises(PlanError, match="layer 0 is not a softmax-attention layer"):
        qkrestore.merge(pre, post, tmp_path / "y", layers=[0])
    with pytest.raises(PlanError, match="unknown option"):
        qkrestore.merge(pre, post, tmp_path / "z", overwrite_everything=True)  # type: ignore[call-arg]
    with pytest.raises(QKRestoreError, match="MODEL"):
        qkrestore.inspect_layers(tmp_path / "taken")
    with pytest.raises(QKRestoreError, match=r"qkrestore\.json"):
        qkrestore.verify(tmp_path / "taken")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))
