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
    """No wall-clock timeout: the toy's budgets are steps, and it runs single-threaded (on a loaded
    2-core machine two intra-op threads cost 10-30x the CPU), so load slows it but cannot fail it."""
    out = tmp_path / "toy"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), "--size", "toy", "--device", "cpu",
         "--also-targets", "q,k,v,o", "--locate", "--sft-freeze-embeddings"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]

    for name in (
        "report.md", "results.json", "recall.png", "log.txt", "drift.png", "drift.json",
        "drift-long.json", "attn-distance.png", "attn-distance.json", "autocorr-pretrain.json",
        "autocorr-cot.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 1 and results["config"]["pre_seconds"] is None
    assert results["pretrain"]["steps"] == results["config"]["pre_steps"]
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


# -- the analog setup (issue 17) -------------------------------------------------------------


def _analog_modules():
    sys.path.insert(0, str(RUN.parent))
    try:
        import analog
        import data
        import markov_cot
        import train
    finally:
        sys.path.remove(str(RUN.parent))
    return analog, data, markov_cot, train


def test_markov_traces_compute_the_running_class_sum_over_the_whole_vocabulary() -> None:
    import numpy as np

    _, data, mc, _ = _analog_modules()
    task = mc.MarkovCoT(data.Vocab(), lam=0.75)
    rng = np.random.default_rng(0)
    content = set(range(data.N_SPECIAL, task.vocab.fill0 + task.vocab.n_fill))
    seen: set[int] = set()
    for _ in range(400):
        n = int(rng.integers(3, 11))
        prompt, resp = task.example(rng, n)
        assert prompt[:2] == [data.BOS, data.PROB] and prompt[-2:] == [data.EQ, data.NL]
        xs, ys = prompt[2:-2], resp[:-3]
        assert len(xs) == len(ys) == n and resp[-3] == data.ANS and resp[-1] == data.EOS
        s = 0
        for x, y in zip(xs, ys, strict=True):
            s = (s + (x - data.N_SPECIAL) % 10) % 10  # the running sum of the classes
            assert (y - data.N_SPECIAL) % 10 == s  # ... is y's class
            assert (y - data.N_SPECIAL) // 10 == (x - data.N_SPECIAL) // 10  # x's variant, quoted
        assert resp[-2] == data.DIGIT0 + s
        seen |= set(xs) | set(ys)
    assert seen == content  # every needle key, value and filler token is in the SFT data
    ids, labels = task.batch(rng, 8, 3, 10)
    assert ((labels == -100) | (labels == ids)).all()
    assert (ids[labels != -100] != data.PAD).all()


@pytest.mark.parametrize("lam", [0.6, 0.85])
def test_autocorr_recovers_the_latent_chains_decay_length(tmp_path: Path, lam: float) -> None:
    """`qkrestore autocorr` on the Markov CoT traces finds τ = −1/ln λ₂ within 20 %."""
    import numpy as np

    _, data, mc, _ = _analog_modules()
    task = mc.MarkovCoT(data.Vocab(), lam=lam)
    corpus = tmp_path / "cot.jsonl"
    with open(corpus, "w") as f:
        for t in task.traces(np.random.default_rng(1), 30_000, 3, 10):
            f.write(json.dumps({"input_ids": t}) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-m", "qkrestore", "autocorr", str(corpus), "--max-distance", "32",
         "--json"], env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    tau = json.loads(res.stdout)["tau"]
    assert abs(tau / task.tau - 1) < 0.2, (tau, task.tau)


def _toy_model(tied: bool = True):
    _, data, _, train = _analog_modules()
    return train.build_model(data.Vocab(n_keys=32, n_vals=16, n_fill=32).size, "toy", 0, tied=tied)


def _linear_response(model, length: int = 96, early: int = 8) -> tuple[list[float], int]:
    """Per position: how much the first linear layer's output moves when the first ``early``
    inputs change."""
    import torch

    layer = next(m for m in model.modules() if hasattr(m, "A_log"))
    torch.manual_seed(1)
    x = torch.randn(1, length, model.config.hidden_size)
    y = x.clone()
    y[:, :early] = torch.randn(1, early, model.config.hidden_size)
    with torch.no_grad():
        a, b = (layer(h) for h in (x, y))
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    diff = (a - b).norm(dim=-1)[0] / a.norm(dim=-1)[0]
    return diff.tolist(), early


def test_fixed_linear_decay_forgets_within_the_needle_distance() -> None:
    import torch

    analog, _, _, _ = _analog_modules()
    slow = _toy_model()
    analog.fix_linear_decay(slow, 0.999)
    diff, early = _linear_response(slow)
    assert min(diff[60:]) > 1e-3  # a slow decay: the change still shows 50+ tokens later

    model = _toy_model(tied=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert analog.fix_linear_decay(model, 0.8) == 3
    diff, early = _linear_response(model)
    assert min(diff[early : early + 3]) > 1e-2  # the next few tokens still see the change
    assert max(diff[60:]) < 1e-4  # 50+ tokens later it is gone
    # the decay is frozen: a training step moves other weights but not those three
    layer = next(m for m in model.modules() if hasattr(m, "A_log"))
    before = [t.detach().clone() for t in (layer.A_log, layer.dt_bias, layer.in_proj_a.weight)]
    other = layer.out_proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = (layer.A_log, layer.dt_bias, layer.in_proj_a.weight)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not torch.equal(other, layer.out_proj.weight)


def test_ablations_zero_the_selected_rows_and_leave_the_model_as_it_was() -> None:
    import torch

    analog, _, _, _ = _analog_modules()
    model = _toy_model(tied=False)
    names = list(model.state_dict())
    q = "model.layers.3.self_attn.q_proj.weight"
    qk_set = {q: ((0, 16), (32, 48)), "model.layers.3.self_attn.k_proj.weight": None}
    sels = analog.select_ablations(names, qk_set, list(model.config.layer_types))
    assert sels["softmax W_Q zeroed (all softmax layers)"] == {q: ((0, 16), (32, 48))}
    mixers = [k for k in sels if k.startswith("linear mixer zeroed (layer")]
    assert len(mixers) == 3 and "linear mixers zeroed (all linear layers)" in sels
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def measure(m) -> dict[str, float]:
        sd = m.state_dict()
        seen[len(seen)] = {
            k: sd[k].clone() for k in (q, "model.layers.0.linear_attn.out_proj.weight")
        }
        return {"96": 0.5}

    out = analog.ablate(model, measure, sels)
    wq = seen[0][q]
    assert (wq[0:16] == 0).all() and (wq[32:48] == 0).all()
    assert torch.equal(wq[16:32], before[q][16:32])  # the gate rows are left
    assert (seen[1]["model.layers.0.linear_attn.out_proj.weight"] == 0).all()
    assert out["softmax W_Q zeroed (all softmax layers)"] == {"tensors": 1, "recall": {"96": 0.5}}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_row_freezer_holds_the_qk_restore_rows_through_training(tmp_path: Path) -> None:
    import torch

    analog, _, _, _ = _analog_modules()
    locate = _reproduce_modules()[2]
    model = _toy_model(tied=False)
    model.save_pretrained(tmp_path / "m")
    qk_set, gate = locate.qk_restore_selections(str(tmp_path / "m"), str(tmp_path / "m"))
    assert qk_set and gate
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    freeze = analog.RowFreezer(model, qk_set)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        freeze()
    params = dict(model.named_parameters())
    for name, rows in qk_set.items():
        for a, b in rows or ((0, params[name].shape[0]),):
            assert torch.equal(params[name].detach()[a:b], before[name][a:b]), name
    for name, rows in gate.items():  # QK-Frozen lets Qwen3.5's gate rows of q_proj train
        a, b = rows[0]
        assert not torch.equal(params[name].detach()[a:b], before[name][a:b])


def test_reproduce_analog_toy_end_to_end(tmp_path: Path) -> None:
    """The analog setup at toy size: every flag recorded, untied checkpoints, the SFT curve,
    Table 4's models, the zeroing ablations, QK-Frozen's held rows and the seed aggregate."""
    out = tmp_path / "an"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), "--size", "toy", "--device", "cpu",
         "--setup", "analog", "--pre-steps", "12", "--sft-steps", "6", "--curve-every", "3",
         "--ridges", "1", "--lengths", "96", "--also-targets", "none", "--also-targets", "v"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    setup = results["setup"]
    assert setup["name"] == "analog" and setup["untied"] is True
    assert setup["linear_decay"] == 0.8 and setup["cot_task"] == "markov"
    assert setup["lr_ratio"] <= 0.1 and setup["budget"] == "steps"
    assert results["pretrain"]["steps"] == 12 and results["sft"]["steps"] == 6
    assert [p["step"] for p in results["sft"]["curve"]] == [0, 3, 6]
    assert all(set(p["recall"]) == {"96"} for p in results["sft"]["curve"])
    assert set(results["models"]) == {
        "PRE", "+SFT", "+QK-Restore", "+Restore {v}", "+QK-Pro (R=1)", "QK-Frozen SFT",
    }  # fmt: skip
    abl = results["ablations"]["PRE"]
    assert "softmax W_Q zeroed (all softmax layers)" in abl
    assert sum(k.startswith("linear mixer zeroed (layer") for k in abl) == 3
    assert results["autocorr"]["cot"]["tokens"] > 100_000

    from safetensors.numpy import load_file

    ckpt = out / "ckpt"
    pre_w = load_file(ckpt / "pre" / "model.safetensors")
    sft_w = load_file(ckpt / "sft" / "model.safetensors")
    frozen_w = load_file(ckpt / "qk-frozen" / "model.safetensors")
    assert "lm_head.weight" in pre_w  # untied: saved as a tensor of its own
    assert not (pre_w["lm_head.weight"] == pre_w["model.embed_tokens.weight"]).all()
    for k in (k for k in pre_w if k.endswith(("A_log", "dt_bias", "in_proj_a.weight"))):
        assert (pre_w[k] == sft_w[k]).all()  # the fixed decay stayed fixed through SFT
    plan = json.loads((ckpt / "qkrestore" / "qkrestore.json").read_text())["plan"]["tensors"]
    for t in plan:  # QK-Frozen kept exactly the rows QK-Restore restores
        for a, b in t["rows"]:
            assert (frozen_w[t["name"]][a:b] == pre_w[t["name"]][a:b]).all()
    assert not (frozen_w["lm_head.weight"] == pre_w["lm_head.weight"]).all()

    agg = subprocess.run(
        [sys.executable, str(RUN.parent / "aggregate.py"), str(out), str(out), "--out",
         str(tmp_path / "agg")], capture_output=True, text=True,
    )  # fmt: skip
    assert agg.returncode == 0, agg.stderr[-2000:]
    text = (tmp_path / "agg.md").read_text()
    pre_row = next(line for line in text.splitlines() if line.startswith("| PRE |"))
    r = results["models"]["PRE"]["recall"]["96"]
    assert pre_row.split(" | ")[1] == f"{100 * r:.1f} ± 0.0"  # two copies of one run: no spread
    assert "V-Restore" in text and "QK-Frozen" in text and "Along SFT" in text
    # the setup's default Table 4 targets were dropped by "none", then v added back
    assert results["config"]["also_targets"] == ["v"]
    assert (tmp_path / "agg.png").stat().st_size > 0


def test_sweep_items_are_the_probes_queries_and_the_cot_problems(tmp_path: Path) -> None:
    """run.py --sweep hands `qkrestore sweep` the run's own probe: each recall item is one query's
    prompt up to its key with the two needle values as answer, each reasoning item a whole trace."""
    sys.path.insert(0, str(RUN.parent))
    try:
        import run
        import sizes
    finally:
        sys.path.remove(str(RUN.parent))
    _, data, mc, _ = _analog_modules()
    cfg = sizes.resolve("toy", "analog")
    vocab = data.Vocab(**cfg["vocab"])
    task = mc.MarkovCoT(vocab, cfg["cot_lambda"])
    rec, rea = tmp_path / "rec.jsonl", tmp_path / "rea.jsonl"
    run.write_sweep_items(rec, rea, data.Markov(vocab), cfg, 0, task)
    items = [json.loads(line) for line in rec.read_text().splitlines()]
    assert {x["group"] for x in items} == {str(L) for L in cfg["lengths"]}
    for x in items:
        p, (v1, v2) = x["prompt"], x["answer"]
        assert p[-2] == data.QUERY  # the prompt ends with "QUERY key"
        needle = [i for i in range(len(p) - 3) if p[i] == data.NEEDLE and p[i + 1] == p[-1]]
        assert len(needle) == 1 and p[needle[0] + 2 : needle[0] + 4] == [v1, v2]
        assert len(p) < int(x["group"])
    problems = [json.loads(line) for line in rea.read_text().splitlines()]
    assert len(problems) == max(1, cfg["eval_problems"] // 2)
    for x in problems:
        assert x["prompt"][:2] == [data.BOS, data.PROB] and x["answer"][-1] == data.EOS
        n = len(x["prompt"]) - 4
        assert len(x["answer"]) == n + 3


def test_aggregate_sweep_table_means_the_change_from_each_runs_post() -> None:
    """The seed aggregate of `qkrestore sweep`: Δ columns are taken within each run (candidate minus
    that run's POST) before averaging, and the front/pick counts come from each run's JSON."""
    sys.path.insert(0, str(RUN.parent))
    try:
        import aggregate
    finally:
        sys.path.remove(str(RUN.parent))

    def cand(name: str, rec: float, exact: float, ll: float, front: bool) -> dict:
        return {"name": name, "recall": {"128": rec, "1024": rec - 0.1}, "recall_mean": rec,
                "reasoning": {"exact": exact, "loglik": ll}, "pareto": front}  # fmt: skip

    runs = [
        {"sweep": {"pick": {"name": "qk-restore"}, "candidates": [
            cand("post", 0.60, 0.20, -1.0, True), cand("qk-restore", 0.80, 0.10, -1.5, True)]}},
        {"sweep": {"pick": {"name": "post"}, "candidates": [
            cand("post", 0.90, 0.30, -2.0, True), cand("qk-restore", 0.94, 0.30, -2.1, False)]}},
        {"sweep": None},  # a run without a sweep is left out, not counted as a zero
    ]  # fmt: skip
    lines = aggregate.sweep_table(runs)
    assert "n = 2 runs" in lines[1]
    row = next(x for x in lines if x.startswith("| qk-restore |")).split(" | ")
    # recall 80 and 94; Δ recall +20 and +4 → 12.0 ± 11.3; Δ loglik −0.5 and −0.1 → −0.300 ± 0.283
    assert row[1] == "87.0 ± 9.9" and row[2] == "77.0 ± 9.9"
    assert row[5] == "12.0 ± 11.3" and row[6] == "-5.0 ± 7.1" and row[7] == "-0.300 ± 0.283"
    assert row[8] == "1/2" and row[9].startswith("1/2")
    post = next(x for x in lines if x.startswith("| post |")).split(" | ")
    assert post[5] == "0.0 ± 0.0" and post[8] == "2/2"
    assert aggregate.sweep_table([{"sweep": None}]) == []
