"""`qkrestore sweep`: every candidate held in memory is the checkpoint merge/pro writes for the same
options (same logits), the reasoning metric is what docs/sweep.md says, the Pareto front and the
--pick rule choose as stated, and the written recipe rebuilds the picked candidate.

The references are computed here with plain transformers and torch, not through qkrestore's
evaluation code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, build_hf_pair, load_all, raw

from qkrestore.errors import QKRestoreError
from qkrestore.evaluate import runner as evaluation
from qkrestore.evaluate.candidates import ModelPatcher, PlanSettings, plan_candidate, plan_values
from qkrestore.evaluate.runner import (
    Item,
    Runner,
    _batches,
    _vocabulary,
    example_reasoning_file,
    load_items,
    summarise_items,
)
from qkrestore.evaluate.sweep import (
    SweepConfig,
    base_candidates,
    choose,
    pareto_front,
    parse_pick,
    recipe_text,
    top_k_candidates,
)
from qkrestore.io.checkpoint import Checkpoint
from qkrestore.io.runtime import quiet_transformers
from qkrestore.testing import tiny

EXAMPLE = example_reasoning_file()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_tokenizer():
    """The probe's word-level tokenizer, also knowing the shipped reasoning example's words."""
    return tiny.word_tokenizer(tiny.example_texts())


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A Qwen3-Next-style hybrid: gated q_proj, global layers 1 and 3."""
    return build_hf_pair(tmp_path_factory.mktemp("sweep"), "qwen3_next", QWEN3_NEXT, noise=0.05)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama (3 global layers, GQA) with a word-level tokenizer: fast enough to sweep."""
    tok = word_tokenizer()
    specials = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    pre, post = build_hf_pair(
        tmp_path_factory.mktemp("dense"),
        "llama",
        {"vocab_size": len(tok), "num_hidden_layers": 3, "num_attention_heads": 4}
        | {"num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024}
        | specials,
        noise=0.05,
    )
    tok.save_pretrained(pre)
    tok.save_pretrained(post)
    return pre, post


def load(path: Path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


INPUT = torch.tensor([[1, 5, 9, 14, 22, 31, 7, 40, 12, 3, 18, 27, 33, 8]])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=INPUT).logits


# The test's own statement of which merge/pro options each candidate stands for.
CLI_ARGS = {
    "qk-restore": ["merge"],
    "qk-restore@1": ["merge", "--layers", "1"],
    "qk-restore@3": ["merge", "--layers", "3"],
    "restore-q": ["merge", "--targets", "q"],
    "restore-k": ["merge", "--targets", "k"],
    "restore-v": ["merge", "--targets", "v"],
    "pro-key-r0.5": ["pro", "--fix", "key", "--ridge", "0.5"],
    "pro-query-r2": ["pro", "--fix", "query", "--ridge", "2"],
    "cross-gram-key": ["pro", "--fix", "key", "--form", "cross-gram"],
    "cross-gram-query": ["pro", "--fix", "query", "--form", "cross-gram"],
}


def test_candidates_in_memory_equal_written_checkpoints(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    cfg = SweepConfig(
        ridges=(0.5, 2.0), groups=("restore", "single", "ablations", "pro", "cross-gram")
    )
    cands = base_candidates([1, 3], cfg)
    by_name = {c.name: c for c in cands}
    assert set(by_name) == {*CLI_ARGS, "pro-key-r2", "pro-query-r0.5"}
    model = load(post)
    post_logits = logits(model)
    patcher = ModelPatcher(model)
    settings = PlanSettings(device="cpu")
    with Checkpoint.open(pre) as a, Checkpoint.open(post) as b:
        for name, args in CLI_ARGS.items():
            plan = plan_candidate(by_name[name], a, b, settings)
            patcher.apply(plan, plan_values(plan, a, b))
            held = logits(model)
            out = tmp_path / name
            res = cli(
                args[0],
                pre,
                post,
                "-o",
                out,
                *args[1:],
                *(["--device", "cpu"] if args[0] == "pro" else []),
            )
            assert res.code == 0, res.err
            written = logits(load(out))
            assert torch.equal(held, written), name
            assert not torch.equal(held, post_logits), name
    patcher.reset()
    assert torch.equal(logits(model), post_logits)


def test_candidate_lists_and_topk() -> None:
    cfg = SweepConfig(ridges=(1.0,), fixes=("key",))
    names = [c.name for c in base_candidates([2, 5, 9], cfg)]
    assert names == [
        "pre",
        "post",
        "qk-restore",
        "qk-restore@2",
        "qk-restore@5",
        "qk-restore@9",
        "restore-q",
        "restore-k",
        "restore-v",
        "pro-key-r1",
        "cross-gram-key",
    ]
    # one planned layer: no single-layer candidates (they would equal qk-restore)
    assert "qk-restore@2" not in [c.name for c in base_candidates([2], cfg)]
    top = top_k_candidates([9, 2, 5, 7], (2, 3, 4, 1))
    assert [(c.name, c.layers) for c in top] == [
        ("qk-restore-top2", (2, 9)),
        ("qk-restore-top3", (2, 5, 9)),
    ]


# -- the metrics ----------------------------------------------------------------------------------


def direct_scores(model, tok, prompt: str, answer: str) -> tuple[bool, float]:
    """Greedy decoding token by token, and log-probabilities from growing prefixes."""
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    seq, lps = list(p), []
    gen = []
    with torch.inference_mode():
        for j in range(len(a)):
            out = model(input_ids=torch.tensor([p + a[:j]])).logits[0, -1]
            lps.append(float(torch.log_softmax(out.double(), -1)[a[j]]))
            nxt = model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()
            gen.append(int(nxt))
            seq.append(int(nxt))
    return gen == a, sum(lps) / len(lps)


def test_reasoning_metric_on_the_shipped_file(dense) -> None:
    _, post = dense
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(post))
    model = load(post)
    items = load_items(EXAMPLE, "--reasoning")
    lines = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    assert len(items) == len(lines) >= 20
    runner = Runner(model, tok, torch.device("cpu"), autocast=False, label="post")
    rows = runner.score_items(items)
    want = [direct_scores(model, tok, d["prompt"], d["answer"]) for d in lines]
    for r, (exact, ll) in zip(rows, want):
        assert r["exact"] == exact
        assert r["loglik"] == pytest.approx(ll, abs=1e-4)
    summary = summarise_items(rows)
    assert summary["loglik"] == pytest.approx(sum(w[1] for w in want) / len(want), abs=1e-4)
    assert summary["exact"] == sum(w[0] for w in want) / len(want)

    # exact match is not trivially 0: answers that are the model's own greedy continuation count
    mixed = []
    for k, d in enumerate(lines[:6]):
        p = tok(d["prompt"])["input_ids"]
        with torch.inference_mode():
            seq = list(p)
            for _ in range(2):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        cont = seq[len(p) :]
        if k % 2:  # break the second token
            cont = [cont[0], (cont[1] + 1) % len(tok)]
        mixed.append(Item(tuple(p), tuple(cont)))
    got = summarise_items(runner.score_items(mixed))
    assert got["exact"] == 0.5


def test_batched_scoring_equals_one_at_a_time(dense, monkeypatch) -> None:
    """Right padding cannot change a causal LM's scores: batches of mixed lengths give the rows
    that one forward pass per item gives, in the items' order."""
    _, post = dense
    model = load(post)
    rng = random.Random(3)
    vocab = model.config.vocab_size
    items = [
        Item(
            tuple(rng.randrange(vocab) for _ in range(rng.randrange(3, 40))),
            tuple(rng.randrange(vocab) for _ in range(rng.randrange(1, 6))),
        )
        for _ in range(23)
    ]
    # one item that is the model's own greedy continuation, so that "exact" is not all False
    seq = [5, 9, 11]
    with torch.inference_mode():
        for _ in range(3):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    items.append(Item(tuple(seq[:3]), tuple(seq[3:])))
    one = Runner(model, None, torch.device("cpu"), autocast=False, label="p").score_items(items)
    many = Runner(model, None, torch.device("cpu"), autocast=False, label="p", batch_size=7)
    ticks: list[int] = []
    rows = many.score_items(items, ticks.append)
    assert sum(ticks) == len(items) and len(ticks) == 4  # 24 items in batches of ≤ 7
    assert [r["exact"] for r in rows] == [r["exact"] for r in one]
    assert rows[-1]["exact"] is True
    for r, o in zip(rows, one):
        assert r["tokens"] == o["tokens"]
        assert r["loglik"] == pytest.approx(o["loglik"], abs=1e-5)

    # a logits cap of 60 tokens' worth splits the longest items into batches of one or two
    monkeypatch.setattr(evaluation, "BATCH_LOGITS", 60 * vocab)
    capped: list[int] = []
    rows = many.score_items(items, capped.append)
    assert sum(capped) == len(items) and len(capped) > len(ticks)
    assert [r["exact"] for r in rows] == [r["exact"] for r in one]


def test_batches_bound_items_and_padded_tokens() -> None:
    cap = 1000
    lengths = [cap, cap // 2, cap // 4, 100, 90, 80, 70, 60]
    got = list(_batches(range(len(lengths)), lengths, 3, cap))
    assert got == [[0], [1, 2], [3, 4, 5], [6, 7]]
    for b in got:  # longest first, so the first item is the batch's width
        assert len(b) <= 3 and (len(b) == 1 or len(b) * lengths[b[0]] <= cap)
    assert list(_batches([0], [5 * cap], 8, cap)) == [[0]]  # too long for any batch: alone


def test_batch_cap_counts_the_vocabulary(dense) -> None:
    """The batch's token cap is BATCH_LOGITS over the output layer's rows (the logits' width)."""
    _, post = dense
    model = load(post)
    assert _vocabulary(model) == model.config.vocab_size == model.lm_head.weight.shape[0]
    assert _vocabulary(object()) == 1


def test_items_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(QKRestoreError, match=r"bad.jsonl:2: .*'prompt' and 'answer'"):
        load_items(bad, "--reasoning")
    bad.write_text('{"prompt": [1, -2], "answer": "b"}\n')
    with pytest.raises(QKRestoreError, match="token ids"):
        load_items(bad, "--reasoning")
    bad.write_text("{not json\n")
    with pytest.raises(QKRestoreError, match="not valid JSON"):
        load_items(bad, "--reasoning")


# -- Pareto front and --pick ----------------------------------------------------------------------


def test_pareto_front() -> None:
    pts = [(0.2, 0.9), (0.8, 0.5), (0.5, 0.5), (0.8, 0.5), (0.1, 0.95), (None, 1.0), (0.8, 0.4)]
    # (0.5,0.5) is beaten by (0.8,0.5); equal points do not beat each other; None is never on it
    assert pareto_front(pts) == [True, True, False, True, True, False, False]


def results() -> list[dict]:
    def r(name, rec, reas, **kw):
        return {"name": name, "recall": rec, "recall_mean": sum(rec.values()) / 2,
                "reasoning_score": reas, "reasoning": {"exact": reas, "loglik": -reas}} | kw  # fmt: skip

    return [
        r("pre", {"128": 0.9, "256": 0.9}, 0.2),
        r("post", {"128": 0.4, "256": 0.1}, 0.8),
        r("qk-restore", {"128": 0.8, "256": 0.6}, 0.7),
        r("pro-key-r1", {"128": 0.6, "256": 0.5}, 0.78),
        r("cross-gram-key", {"128": 0.7, "256": 0.7}, 0.75),
    ]


@pytest.mark.parametrize(
    ("rule", "want"),
    [
        ("max recall with reasoning ≥ 0.95 × POST", "pro-key-r1"),
        ("max recall@128 with reasoning >= 0.95*POST", "pro-key-r1"),
        ("max recall@128 with reasoning >= 0.85 x post", "qk-restore"),
        ("max recall", "pre"),
        ("max reasoning", "post"),
        ("min recall@256", "post"),
        ("max recall where reasoning > 0.75 and recall@256 >= 0.5", "pro-key-r1"),
        ("max recall with loglik >= POST - 0.06", "pre"),
        ("max recall with loglik <= POST + 0.06", "cross-gram-key"),
        ("max recall with reasoning >= POST + 0.01", None),
    ],
)
def test_pick_rules(rule: str, want: str | None) -> None:
    res = results()
    idx = choose(parse_pick(rule), res)
    assert (res[idx]["name"] if idx is not None else None) == want


@pytest.mark.parametrize(
    ("rule", "msg"),
    [
        ("best recall", "start with 'max' or 'min'"),
        ("max speed", "unknown metric"),
        ("max recall if reasoning", "METRIC OP BOUND"),
        ("max recall with reasoning >= 0.9 * ", "cannot read the bound"),
        ("max recall given reasoning >= 1", "expected 'with'"),
    ],
)
def test_pick_rule_errors(rule: str, msg: str) -> None:
    with pytest.raises(QKRestoreError, match=msg):
        parse_pick(rule)
    with pytest.raises(QKRestoreError, match="no candidate named 'base'"):
        choose(parse_pick("max recall with reasoning >= base"), results())


# -- the command ----------------------------------------------------------------------------------


def test_sweep_cli(dense, tmp_path: Path, cli) -> None:
    pre, post = dense
    png, recipe = tmp_path / "sweep.png", tmp_path / "pick.yaml"
    res = cli(
        "sweep", pre, post, "--lengths", "128", "--samples", "1", "--task", "single-1",
        "--reasoning", "example", "--reasoning-metric", "loglik", "--ridges", "1",
        "--candidates", "pre,post,restore,single,top-k,ablations,pro,cross-gram", "--top-k", "2",
        "--pick", "max loglik with recall >= 0", "--write-recipe", recipe, "--plot", png,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    names = [r["name"] for r in doc["candidates"]]
    assert names == [
        "pre", "post", "qk-restore", "qk-restore@0", "qk-restore@1", "qk-restore@2",
        "qk-restore-top2", "restore-q", "restore-k", "restore-v", "pro-key-r1", "pro-query-r1",
        "cross-gram-key", "cross-gram-query",
    ]  # fmt: skip
    assert doc["layers"] == [0, 1, 2] and doc["niah"]["lengths"] == [128]
    # top-2 restores the two layers whose single restore reached most recall (then reasoning)
    singles = sorted(
        (r for r in doc["candidates"] if r["group"] == "single"),
        key=lambda r: (-r["recall_mean"], -r["reasoning_score"], r["planned_layers"]),
    )
    top2 = next(r for r in doc["candidates"] if r["name"] == "qk-restore-top2")
    assert top2["planned_layers"] == sorted(r["planned_layers"][0] for r in singles[:2])
    for r in doc["candidates"]:
        assert set(r["recall"]) == {"128"} and r["recall"]["128"] in (0.0, 1.0)
        assert r["reasoning"]["items"] == 24 and r["reasoning_score"] == r["reasoning"]["loglik"]
    # the front and the pick, recomputed here from the reported numbers
    pts = [(r["recall_mean"], r["reasoning_score"]) for r in doc["candidates"]]
    for i, r in enumerate(doc["candidates"]):
        beaten = any(a >= pts[i][0] and b >= pts[i][1] and (a, b) != pts[i] for a, b in pts)
        assert r["pareto"] == (not beaten)
    best = max(doc["candidates"], key=lambda r: r["reasoning"]["loglik"])
    assert doc["pick"]["name"] == best["name"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    if best["kind"] in ("pre", "post"):
        pytest.skip("the random model's best candidate is a checkpoint itself")
    # the recipe rebuilds the picked candidate: same bytes as the explicit command
    cmd = "merge" if best["kind"] == "restore" else "pro"
    a, b = tmp_path / "from-recipe", tmp_path / "explicit"
    r1 = cli(cmd, pre, post, "-o", a, "--config", recipe, "--json")
    assert r1.code == 0, r1.err
    assert json.loads(r1.out)["layers"] == best["planned_layers"]
    assert cli(cmd, pre, post, "-o", b, *CLI_ARGS_FOR(best)[1:]).code == 0
    ta, _ = load_all(a)
    tb, _ = load_all(b)
    assert all(raw(ta[n]) == raw(tb[n]) for n in tb)


def CLI_ARGS_FOR(r: dict) -> list[str]:
    if r["kind"] == "restore":
        return [
            "merge",
            "--layers",
            ",".join(map(str, r["planned_layers"])),
            "--targets",
            ",".join(r["targets"]),
        ]
    args = ["pro", "--layers", ",".join(map(str, r["planned_layers"])), "--fix", r["fix"]]
    return args + (["--ridge", str(r["ridge"])] if r["form"] == "ridge" else ["--form", r["form"]])


def test_sweep_recipe_for_post_is_refused(dense, tmp_path: Path, cli) -> None:
    pre, post = dense
    args = (
        "sweep", pre, post, "--candidates", "post,restore", "--recall", EXAMPLE,
        "--pick", "max recall with recall >= POST", "--write-recipe", tmp_path / "r.yaml",
        "--device", "cpu", "--quiet",
    )  # fmt: skip
    # the random model's recall on the example file is 0 for both: the first (POST) wins, and
    # the probe cannot decide; that doubt is what the one error line names first
    res = cli(*args)
    assert res.code == 2 and len(res.err_lines) == 1
    assert res.err_lines[0].startswith("error: --write-recipe: the probe cannot decide")
    # with --force, the pick itself is refused: POST is a checkpoint, not a recipe
    res = cli(*args, "--force")
    assert res.code == 2 and "checkpoint as it is" in res.err and len(res.err_lines) == 1
    assert not (tmp_path / "r.yaml").exists()


def test_sweep_usage_errors(dense, tmp_path: Path, cli) -> None:
    pre, post = dense
    r = cli("sweep", pre, post, "--candidates", "pro,magic")
    assert r.code == 2 and "--candidates" in r.err and len(r.err_lines) == 1
    r = cli("sweep", pre, post, "--pick", "max speed")
    assert r.code == 2 and "unknown metric" in r.err
    r = cli("sweep", pre, tmp_path / "nope")
    assert r.code == 2 and "not a local model folder" in r.err


def test_lm_eval_missing_is_one_line(dense, cli, monkeypatch) -> None:
    """Without lm_eval importable, --lm-eval fails before any model is loaded."""
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    pre, post = dense
    r = cli("sweep", pre, post, "--lm-eval", "niah_single_1")
    assert r.code == 2 and len(r.err_lines) == 1
    assert 'pip install "qkrestore[eval]"' in r.err
    r = cli("select-layers", pre, "--lm-eval", "niah_single_1")
    assert r.code == 2 and len(r.err_lines) == 1 and "lm_eval" in r.err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sweep_on_cuda(pair, dense, tmp_path: Path, cli) -> None:
    """On a GPU: candidates held there (QK-Pro solved there) give the logits of the checkpoints
    `merge`/`pro --device cuda` write; a bf16-autocast sweep runs and says so."""
    pre, post = pair
    dev = torch.device("cuda")
    cfg = SweepConfig(ridges=(0.5,), groups=("restore", "pro", "cross-gram"))
    model = load(post).to(dev)
    patcher = ModelPatcher(model)
    with Checkpoint.open(pre) as a, Checkpoint.open(post) as b:
        for cand in base_candidates([1, 3], cfg):
            plan = plan_candidate(cand, a, b, PlanSettings(device="cuda"))
            patcher.apply(plan, plan_values(plan, a, b))
            with torch.inference_mode():
                held = model(input_ids=INPUT.to(dev)).logits
            args = CLI_ARGS.get(cand.name) or ["pro", "--fix", cand.fix, "--ridge", "0.5"]
            out = tmp_path / cand.name
            extra = ["--device", "cuda"] if args[0] == "pro" else []
            assert cli(args[0], pre, post, "-o", out, *args[1:], *extra).code == 0
            with torch.inference_mode():
                written = load(out).to(dev)(input_ids=INPUT.to(dev)).logits
            torch.testing.assert_close(held, written, rtol=1e-5, atol=1e-5)
    pre, post = dense
    res = cli(
        "sweep", pre, post, "--candidates", "post,restore,cross-gram", "--lengths", "128",
        "--samples", "2", "--reasoning", "example", "--device", "cuda", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["autocast"] is True and doc["device"].startswith("cuda")
    assert [r["name"] for r in doc["candidates"]] == [
        "post",
        "qk-restore",
        "cross-gram-key",
        "cross-gram-query",
    ]


@pytest.mark.parametrize(
    ("name", "explicit"),
    [
        ("pro-query-r2", ["pro", "--fix", "query", "--ridge", "2"]),
        ("cross-gram-key", ["pro", "--fix", "key", "--form", "cross-gram"]),
        ("restore-v", ["merge", "--targets", "v"]),
    ],
)
def test_recipes_round_trip(dense, tmp_path: Path, cli, name: str, explicit: list[str]) -> None:
    """The recipe written for a candidate rebuilds it through merge/pro --config, byte for byte."""
    pre, post = dense
    cand = next(c for c in base_candidates([0, 1, 2], SweepConfig(ridges=(2.0,))) if c.name == name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(cand, [0, 1, 2], False, "a test"))
    assert recipe.read_text().startswith("# a test\n# use: qkrestore " + explicit[0])
    a, b = tmp_path / "recipe", tmp_path / "explicit"
    res = cli(explicit[0], pre, post, "-o", a, "--config", recipe, "--json")
    assert res.code == 0, res.err
    assert cli(explicit[0], pre, post, "-o", b, *explicit[1:]).code == 0
    ta, _ = load_all(a)
    tb, _ = load_all(b)
    assert set(ta) == set(tb) and all(raw(ta[n]) == raw(tb[n]) for n in tb)
    assert (
        json.loads(res.out)["plan"]["params"]
        == json.loads((b / "qkrestore.json").read_text())["plan"]["params"]
    )


def test_pick_names_an_unknown_candidate(dense, cli) -> None:
    pre, post = dense
    r = cli(
        "sweep", pre, post, "--candidates", "post,restore", "--recall", EXAMPLE,
        "--pick", "max recall with recall >= 0.9 * base", "--device", "cpu",
    )  # fmt: skip
    assert r.code == 2 and len(r.err_lines) == 1
    assert "no candidate named 'base'" in r.err and "qk-restore" in r.err


def test_sweep_plot_stacks_the_names_of_points_that_would_overlap() -> None:
    """Candidates with (nearly) the same recall and reasoning get one stacked label, so no name is
    printed over another; points apart in either direction keep their own label."""
    from qkrestore.io.plots import label_clusters

    pts = [(0.80, 0.10), (0.90, 0.20), (0.801, 0.1005), (0.80, 0.15), (1.0, 0.0), (0.9005, 0.2)]
    assert label_clusters(pts) == [[0, 2], [1, 5], [3], [4]]
    assert label_clusters([]) == []
    assert label_clusters([(0.5, 0.5), (0.5, 0.5)]) == [[0, 1]]  # zero spans: exact ties only
