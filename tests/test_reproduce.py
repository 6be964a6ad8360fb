"""The reproduction pipeline (scripts/reproduce/run.py) end to end at toy size on the CPU.

Checks that pre-training, CoT-SFT, the real `qkrestore merge` / `pro` / `drift` CLI calls, the
evaluation and the report all run and produce their files; it does not check the effect itself
(a toy model trained for a few seconds learns neither recall nor the arithmetic).
"""

from __future__ import annotations

import itertools
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
        [sys.executable, str(RUN), "--out", str(out), "--size", "toy", "--device", "cpu",
         "--also-targets", "q,k,v,o", "--locate", "--sft-freeze-embeddings"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]

    for name in (
        "report.md", "results.json", "recall.png", "log.txt", "drift.png", "drift.json",
        "drift-long.json", "attn-distance.png", "attn-distance.json", "autocorr-pretrain.json",
        "autocorr-cot.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    expected = {
        "PRE", "+SFT", "+QK-Restore", "+Restore {q,k,v,o}", "+QK-Pro (R=0.1)", "+QK-Pro (R=1)",
        "+SFT-long", "+SFT-long +QK-Restore", "+SFT-long +QK-Pro (R=1)",
    }  # fmt: skip
    assert set(results["models"]) == expected
    for m in results["models"].values():
        assert set(m["recall"]) == {"48", "96"}
        assert all(0.0 <= v <= 1.0 for v in m["recall"].values())
        assert 0.0 <= m["reasoning"]["answer"] <= 1.0
    assert "full_attention" in results["layer_types"]
    assert results["drift"]["layers"], "drift found no softmax layer"
    assert results["drift_long"]["layers"]
    # attn-distance compared PRE, +SFT-long and its QK-Restore on the softmax layer(s)
    attn = results["attn_distance"]
    assert len(attn["models"]) == 3 and attn["models"][0]["layers"]
    assert (
        results["autocorr"]["pretrain"]["tokens"] > 0 and results["autocorr"]["cot"]["tokens"] > 0
    )

    # QK-Restore output really is POST with PRE's routing rows (checked by the tool itself)
    ckpt = out / "ckpt"
    assert (ckpt / "qkrestore" / "qkrestore.json").is_file()
    verify = subprocess.run(
        [sys.executable, "-m", "qkrestore", "verify", str(ckpt / "qkrestore")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-2000:]

    # --locate measured +SFT and +SFT-long with each parameter group of PRE put back
    assert set(results["located"]) == {"+SFT", "+SFT-long"}
    groups = results["located"]["+SFT"]
    assert set(groups) == set(_reproduce_modules()[2].GROUP_NAMES)  # the toy model has every group
    assert all(set(g["recall"]) == {"48", "96"} and g["tensors"] > 0 for g in groups.values())
    # the in-memory QK-Restore set is the tool's plan: the same recall as the merged checkpoint
    qk_set = groups["QK-Restore set (W_Q query rows, W_K, q/k norms)"]
    assert qk_set["recall"] == results["models"]["+QK-Restore"]["recall"]

    # its "restored" rows are the ones the merged checkpoint's recorded plan took from PRE, and
    # "left" the other rows of those tensors (Qwen3.5's gate rows of q_proj)
    restored, left = _reproduce_modules()[2].qk_restore_selections(
        str(ckpt / "pre"), str(ckpt / "sft")
    )
    plan = json.loads((ckpt / "qkrestore" / "qkrestore.json").read_text())["plan"]["tensors"]
    assert restored == {t["name"]: tuple(tuple(r) for r in t["rows"]) for t in plan}
    assert set(left) == {n for n in restored if "q_proj" in n}
    for name, rows in left.items():
        covered = sorted([*restored[name], *rows])
        n_rows = next(t["shape"][0] for t in plan if t["name"] == name)
        assert covered[0][0] == 0 and covered[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))

    # the +Restore {q,k,v,o} ablation is a real merge with those targets
    meta = json.loads((ckpt / "restore-qkvo" / "qkrestore.json").read_text())
    assert "--targets" in meta["command"] and "q,k,v,o" in meta["command"]

    # --sft-freeze-embeddings: SFT moved the weights but not the (tied) token embeddings
    from safetensors.numpy import load_file

    pre_w = load_file(ckpt / "pre" / "model.safetensors")
    sft_w = load_file(ckpt / "sft" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert (pre_w[emb] == sft_w[emb]).all()
    assert results["sft"]["frozen_embeddings"] is True
    moved = [k for k in pre_w if k != emb and not (pre_w[k] == sft_w[k]).all()]
    assert len(moved) > len(pre_w) // 2

    # summary.py turns runs into one table and one figure
    summ = subprocess.run(
        [sys.executable, str(RUN.parent / "summary.py"), str(out), str(out), "--out",
         str(tmp_path / "summary")], capture_output=True, text=True,
    )  # fmt: skip
    assert summ.returncode == 0, summ.stderr[-2000:]
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 * len(expected)
    assert (tmp_path / "summary.png").stat().st_size > 0

    report = (out / "report.md").read_text()
    assert "| PRE |" in report and "+QK-Restore" in report and "qkrestore merge" in report
    assert "qkrestore attn-distance" in report and "qkrestore autocorr" in report
    assert "Where the damage lives" in report


def _reproduce_modules():
    sys.path.insert(0, str(RUN.parent))
    try:
        import data
        import locate
        import train
    finally:
        sys.path.remove(str(RUN.parent))
    return data, train, locate


def test_haystack_answers_are_the_queried_needles_values() -> None:
    import numpy as np

    data, _, _ = _reproduce_modules()
    vocab = data.Vocab()
    markov = data.Markov(vocab)
    rng = np.random.default_rng(3)
    for far, spread in ((False, False), (True, False), (False, True)):
        ids, ans = data.haystack_batch(rng, markov, 6, 256, 8, 4, far=far, spread=spread)
        assert ids.shape == (6, 256)
        for b in range(6):
            # a segment is [NEEDLE or QUERY, key, ..., v1, v2]
            needles = {
                int(ids[b, p + 1]): (int(ids[b, p + data.SEG - 2]), int(ids[b, p + data.SEG - 1]))
                for p in np.flatnonzero(ids[b] == data.NEEDLE)
            }
            assert len(needles) == 8
            for j in range(4):
                v1, v2 = ans[b, j]
                q = v1 - (data.SEG - 2)
                assert v2 == v1 + 1 and ids[b, q] == data.QUERY
                key = int(ids[b, q + 1])
                assert needles[key] == (int(ids[b, v1]), int(ids[b, v2]))
                starts = np.flatnonzero(ids[b] == data.NEEDLE)
                pos = starts[ids[b, starts + 1] == key][0]
                assert pos < q  # the needle comes first
                if not spread:  # the queries close the document
                    assert q >= 256 - data.SEG * 4
                if far:  # the queried needle sits in the first half (or is one of the 4 earliest)
                    assert pos < 128 or pos in starts[:4]


def test_lm_loss_adds_the_focused_tokens_mean_once_more() -> None:
    import torch

    _, train, _ = _reproduce_modules()
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[1, 5:] = -100
    per = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none"
    ).view(2, 6)
    valid = labels[:, 1:] != -100
    plain = train.lm_loss(logits, labels)
    assert torch.allclose(plain, per[valid].mean())
    focus = torch.zeros(2, 7, dtype=torch.bool)
    focus[0, 3] = focus[1, 2] = True
    focus[1, 6] = True  # an ignored label: must not count
    both = train.lm_loss(logits, labels, focus)
    assert torch.allclose(both, per[valid].mean() + (per[0, 2] + per[1, 1]) / 2)


def test_locate_measures_each_group_swapped_in_and_leaves_post_unchanged() -> None:
    import torch

    locate = _reproduce_modules()[2]

    class Attn(torch.nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            # 2 heads of head_dim 2, gated: rows [q0 q0 g0 g0 q1 q1 g1 g1]
            self.q_proj = torch.nn.Linear(3, 8, bias=False)
            torch.nn.init.constant_(self.q_proj.weight, fill)

    class Layer(torch.nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.self_attn = Attn(fill)

    class Tiny(torch.nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Parameter(torch.full((2,), fill))
            self.layer = Layer(fill)  # names like the model's: "layer.self_attn.q_proj.weight"

        def state_dict(self, *a, **k):  # a tied lm_head, as in the reproduction's models
            sd = super().state_dict(*a, **k)
            sd["lm_head"] = sd["embed_tokens"]
            return sd

    pre, post = Tiny(1.0), Tiny(5.0)
    before = {k: v.clone() for k, v in post.state_dict().items()}
    seen = []

    def measure(m: torch.nn.Module) -> dict[str, float]:
        q = m.layer.self_attn.q_proj.weight.detach()
        seen.append((float(m.embed_tokens.detach()[0]), q[:, 0].tolist()))
        return {"8": 0.5}

    groups = {
        "embeddings": locate.by_pattern(pre.state_dict(), r"embed_tokens|lm_head"),
        "query rows": {"layer.self_attn.q_proj.weight": ((0, 2), (4, 6))},
        "gate rows": {"layer.self_attn.q_proj.weight": ((2, 4), (6, 8))},
        "none": locate.by_pattern(pre.state_dict(), r"nothing"),
    }
    out = locate.locate(pre, post, measure, groups)
    # each group was PRE's while measured, the rest POST's (the tied embeddings too, after their
    # turn); a group with no tensor is skipped
    assert seen == [
        (1.0, [5.0] * 8),
        (5.0, [1.0, 1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 5.0]),
        (5.0, [5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0]),
    ]
    assert set(out) == {"embeddings", "query rows", "gate rows"}
    assert out["embeddings"] == {"tensors": 2, "recall": {"8": 0.5}}
    assert all(torch.equal(before[k], v) for k, v in post.state_dict().items())
