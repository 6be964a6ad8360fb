"""The measurement engine: batched NIAH scoring against the per-item generation of earlier versions,
the teacher-forced verdict against greedy generation item by item, models spread by a device map,
and the bounds on lengths, token ids and tokenizers.

The reference ("old path") is reconstructed here from transformers' ``generate``, one prompt at a
time, exactly as ``Runner.niah`` and ``run_niah`` ran it before the engine batched them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_NEXT, TINY
from test_diagnostics import word_tokenizer

from qkrestore.errors import PlanError, QKRestoreError
from qkrestore.evaluate import niah as nh
from qkrestore.evaluate.candidates import ModelPatcher
from qkrestore.evaluate.runner import Item, NiahSettings, Runner, load_items
from qkrestore.evaluate.scoring import eos_ids, forced_pass
from qkrestore.io.runtime import load_causal_lm, quiet_transformers

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save(out: Path, model_type: str, extra: dict) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    tok = word_tokenizer()
    torch.manual_seed(0)
    kw = TINY | extra | {"vocab_size": len(tok), "pad_token_id": 3, "bos_token_id": 1}
    # a wide initialisation, so that greedy answers depend on the prompt
    kw |= {"eos_token_id": 2, "initializer_range": 0.5, "max_position_embeddings": 256}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("eng") / "llama", "llama", {"num_hidden_layers": 2})


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("eng") / "qwen3next", "qwen3_next", QWEN3_NEXT)


def old_generate(model, tok, prompt: str, new_tokens: int) -> list[int]:
    """The per-item path of earlier versions (``Runner.niah``): one prompt, ``generate``."""
    enc = tok(prompt, return_tensors="pt")
    ids = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=3)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def setup(path: Path, lengths=(160, 200), samples=3, new_tokens=6):
    from transformers import AutoTokenizer

    model = load_causal_lm(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    runner = Runner(model, tok, CPU, autocast=False, label=str(path))
    s = NiahSettings(lengths=lengths, samples=samples, max_new_tokens=new_tokens)
    return model, tok, runner, s


@pytest.mark.parametrize("which", ["llama", "hybrid"])
def test_generate_scoring_equals_old_per_item_path(which, request) -> None:
    """Left-padded batched generation gives each prompt the tokens ``generate`` gives it alone."""
    model, tok, runner, s = setup(request.getfixturevalue(which))
    s = NiahSettings(**{**s.__dict__, "scoring": "generate"})
    got = runner.niah_records(s)
    built = runner.niah_prompts(s)
    assert len({len(b[3]) for b in built}) > 1  # prompts of several sizes: padding is exercised
    answers = set()
    for (sample, *_), rec in zip(built, got):
        old = old_generate(model, tok, sample.prompt, s.new_tokens())
        text = tok.decode(old, skip_special_tokens=True)
        assert rec["answer"] == text.strip()[:200]
        assert rec["correct"] == nh.score(text, sample.needle.value)
        answers.add(text)
    assert len(answers) > 1  # the answers depend on the prompt


def test_forced_prefix_is_greedy_generation(llama) -> None:
    """The forced pass's known prefix is, token for token, the start of the greedy answer, and the
    forced verdict equals generation's on every item."""
    model, tok, runner, s = setup(llama)
    got = runner.niah_records(s)
    built = runner.niah_prompts(s)
    pairs = [(b[3], b[4]) for b in built]
    with torch.inference_mode():
        argmax = [a for a, _ in forced_pass(model, pairs, 1, CPU)]
    eos = eos_ids(model, tok)
    for (sample, _, _, _, gold), arg, rec in zip(built, argmax, got):
        old = old_generate(model, tok, sample.prompt, s.new_tokens())
        ok, known = nh.forced_verdict(
            tok.decode, arg, gold, sample.needle.value, s.new_tokens(), eos
        )
        assert known and old[: len(known)] == known
        text = tok.decode(old, skip_special_tokens=True)
        assert rec["correct"] == ok == nh.score(text, sample.needle.value)
        assert rec["answer"] == tok.decode(known, skip_special_tokens=True).strip()


def test_forced_verdict_agrees_with_generation_where_the_model_is_right(llama) -> None:
    """Values the model does answer: taken from its own greedy answers. When the answer starts with
    the value both rules say right; when the value comes later only generation does (the
    documented difference: forced is a lower bound)."""
    model, tok, runner, s = setup(llama, samples=4)
    built = runner.niah_prompts(s)
    eos = eos_ids(model, tok)
    first, later = [], []
    for sample, _, _, ids, _ in built:
        old = old_generate(model, tok, sample.prompt, s.new_tokens())
        answer = tok.decode(old, skip_special_tokens=True)
        head = tok.decode(old[:2], skip_special_tokens=True)
        tail = tok.decode(old[3:5], skip_special_tokens=True)
        first.append((ids, old[:2], head, nh.score(answer, head)))
        if tail and tail not in tok.decode(old[:3]):
            later.append((ids, tok(" " + tail, add_special_tokens=False)["input_ids"], tail))
    assert len(first) == 8 and len(later) >= 4
    with torch.inference_mode():
        out = forced_pass(model, [(p, g) for p, g, *_ in first + later], 1, CPU)
    for (_, gold, value, generated), (arg, _) in zip(first, out):
        ok, _ = nh.forced_verdict(tok.decode, arg, gold, value, s.new_tokens(), eos)
        assert generated and ok  # right by both rules
    for (_, gold, value), (arg, _) in zip(later, out[len(first) :]):
        ok, _ = nh.forced_verdict(tok.decode, arg, gold, value, s.new_tokens(), eos)
        assert not ok  # generation finds it later in the answer; forced does not


def test_forced_verdict_rules() -> None:
    text = {10: "12", 11: "34", 12: "5", 13: ".", 14: "6", 15: "", 2: ""}

    def decode(ids):
        return "".join(text[i] for i in ids)

    gold, eos = [10, 11, 12], {2}
    assert nh.forced_verdict(decode, [10, 11, 12, 13], gold, "12345", 24, eos) == (
        True,
        [10, 11, 12, 13],
    )
    assert not nh.forced_verdict(decode, [10, 11, 12, 14], gold, "12345", 24, eos)[0]
    assert nh.forced_verdict(decode, [10, 11, 12, 2], gold, "12345", 24, eos)[0]  # stops: whole
    # generation stops after 3 tokens: "12345" is its whole answer
    assert nh.forced_verdict(decode, [10, 11, 12, 14], gold, "12345", 3, eos) == (True, gold)
    assert nh.forced_verdict(decode, [10, 14, 12, 13], gold, "12345", 24, eos) == (False, [10, 14])
    # the next token adds no text: the boundary is unknown, so not (yet) right
    assert not nh.forced_verdict(decode, [10, 11, 12, 15], gold, "12345", 24, eos)[0]


# -- device maps ----------------------------------------------------------------------------------


def test_device_map_offload_gives_the_same_scores(llama, tmp_path) -> None:
    """Layer 1, the final norm and the output layer offloaded to disk (accelerate's hooks load
    them for each forward pass): the same NIAH records and item scores as the model in one piece."""
    model, tok, runner, s = setup(llama)
    dm = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "lm_head": "disk",
    }
    split = load_causal_lm(llama, device_map=dm, offload_folder=tmp_path / "off")
    assert split.lm_head.weight.device.type == "meta"  # really offloaded
    other = Runner(split, tok, CPU, autocast=False, label="split")
    assert other.niah_records(s) == runner.niah_records(s)
    gen = NiahSettings(**{**s.__dict__, "scoring": "generate", "samples": 2})
    assert other.niah_records(gen) == runner.niah_records(gen)
    items = [Item((5, 9, 11, 40), (7, 8)), Item(tuple(range(4, 60)), (9,))]
    for a, b in zip(other.score_items(items), runner.score_items(items)):
        assert a["exact"] == b["exact"] and a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)
    # candidates cannot be swapped into offloaded weights: one clear line
    with pytest.raises(PlanError, match="offloaded by --device-map"):
        ModelPatcher(split).param("lm_head.weight", tuple(model.lm_head.weight.shape))


def test_niah_cli_device_map_auto(cli, llama) -> None:
    args = ["niah", llama, "--lengths", "128", "--samples", "2", "--device", "cpu", "--json"]
    plain = json.loads(cli(*args).out)
    r = cli(*args, "--device-map", "auto")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["device_map"] == "auto" and doc["samples"] == plain["samples"]


# -- bounds ---------------------------------------------------------------------------------------


def test_lengths_bounded_by_the_context(cli, llama) -> None:
    base = ["niah", llama, "--samples", "1", "--device", "cpu", "--json"]
    r = cli(*base, "--lengths", "100000000000")
    assert r.code == 2 and len(r.err_lines) == 1 and "at most 4194304" in r.err
    r = cli(*base, "--lengths", "128,300")
    assert r.code == 2 and len(r.err_lines) == 1
    assert "300 beyond" in r.err and "max_position_embeddings 256" in r.err
    r = cli(*base, "--lengths", "256")  # equal to the context: measured, not "beyond"
    assert r.code == 0, r.err
    notes = json.loads(r.out)["notes"]
    assert notes and not any("beyond" in n for n in notes) and "prompt fits" in notes[0]
    r = cli(*base, "--lengths", "300", "--beyond-context")
    assert r.code == 0, r.err
    assert any("length 300 is beyond" in n for n in json.loads(r.out)["notes"])
    with pytest.raises(QKRestoreError, match="at most"):
        NiahSettings(lengths=(10**11,))
    r = cli("select-layers", llama, "--lengths", "512", "--samples", "1", "--device", "cpu")
    assert r.code == 2 and "512 beyond" in r.err_lines[-1]


def test_tokenizer_without_vocabulary_is_refused(cli, llama, tmp_path) -> None:
    """A tokenizer_config.json with no vocabulary yields no tokens: one line, no endless haystack."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((llama / name).read_bytes())
    (bare / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    r = cli("niah", bare, "--lengths", "128", "--samples", "1", "--device", "cpu")
    assert r.code == 2 and len(r.err_lines) == 1
    assert "yields no tokens" in r.err and str(bare) in r.err


def test_token_ids_beyond_the_vocabulary(cli, llama, tmp_path) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(llama)))
    f = tmp_path / "recall.jsonl"
    f.write_text(
        json.dumps({"prompt": [5, 6, 7], "answer": [8]})
        + "\n"
        + json.dumps({"prompt": [5, vocab], "answer": [8]})
        + "\n"
    )
    model = setup(llama)[0]
    runner = Runner(model, None, CPU, autocast=False, label="m")
    with pytest.raises(QKRestoreError, match=rf"recall.jsonl:2: token id {vocab} is beyond"):
        runner.score_items(load_items(f, "--recall"))
    r = cli("select-layers", llama, "--recall", f, "--device", "cpu")
    assert r.code == 2 and f"recall.jsonl:2: token id {vocab}" in r.err_lines[-1]


def test_bench_eval_smoke(tmp_path, monkeypatch) -> None:
    """scripts/bench_eval.py runs end to end on the tiny model (not timed: the figures are for
    docs/performance.md, measured by hand)."""
    import runpy

    script = Path(__file__).parent.parent / "scripts" / "bench_eval.py"
    out = tmp_path / "bench"
    argv = ["bench_eval.py", "--lengths", "96", "--samples", "2", "--repeats", "1"]
    monkeypatch.setattr("sys.argv", [*argv, "--no-cli", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    doc = json.loads((out / "bench_eval.json").read_text())
    (row,) = doc["lengths"]
    assert row["length"] == 96 and row["plain"]["tokens"] == 2 * 96
    for scoring in ("forced", "generate"):
        assert row[scoring]["tokens"] >= 2 * 90 and row[scoring]["ratio"] > 0
        assert 0 <= row[scoring]["accuracy"] <= 1
    assert doc["summary"]["forced"]["ratio"] > 0
    assert "| 96 |" in (out / "bench_eval.md").read_text()


def test_plan_batches_counts_logits_at_the_kept_run_of_positions() -> None:
    """With logits only at the answer positions, a batch's logits are its rows × the one run of
    positions covering their answers, not rows × padded width."""
    from qkrestore.evaluate.scoring import plan_batches

    widths = [1000, 1000, 998, 990, 500]
    spans = [(990, 1000), (990, 1000), (988, 998), (980, 990), (490, 500)]
    # rows × run: 2 × 10, 3 × 12, 4 × 20 = 80 > 60: the fourth starts a batch; the last item's
    # answer is far from the fourth's, so the run would span 500 positions
    got = list(plan_batches(range(5), widths, spans, 8, 10**9, 60))
    assert got == [[0, 1, 2], [3], [4]]
    # counted at every padded position (spans=None) the same cap allows no pairs at all
    assert list(plan_batches(range(5), widths, None, 8, 10**9, 60)) == [[0], [1], [2], [3], [4]]
    # the token budget bounds rows × width
    assert list(plan_batches(range(5), widths, spans, 8, 2000, 10**9)) == [[0, 1], [2, 3], [4]]


def test_prompts_built_in_lock_step_are_the_ones_built_alone() -> None:
    """build_samples (every prompt's token counts of one round in one call, which a fast
    tokenizer's encode_batch spreads over the cores) gives each prompt exactly as build_sample
    gives it alone, in far fewer counting calls; and the runner's encoder pair counts as the
    tokenizer's own call does."""
    from qkrestore.evaluate.runner import _encoder

    tok = word_tokenizer()
    encode, count = _encoder(tok)
    assert count(["the grass is green .", "", nh.NOISE]) == [
        len(tok(t, add_special_tokens=False)["input_ids"])
        for t in ["the grass is green .", "", nh.NOISE]
    ]
    jobs = [
        (task, length, depth, 11 * 100_003 + i)
        for task in nh.TASKS
        for length in (300, 1000)
        for i, depth in enumerate(nh.sample_depths(4, None))
    ]
    alone_calls = [0]

    def counted_encode(text: str) -> list[int]:
        alone_calls[0] += 1
        return encode(text)

    alone = [nh.build_sample(t, n, d, counted_encode, seed=s) for t, n, d, s in jobs]
    rounds = []

    def counting(texts: list[str]) -> list[int]:
        rounds.append(len(texts))
        return count(texts)

    together = nh.build_samples(jobs, encode, counting)
    assert together == alone
    assert all(len(encode(x.prompt)) == x.tokens for x in together)
    # rounds, not prompts × rounds; repeated haystack sentences are counted once
    assert len(rounds) < alone_calls[0] / 10 and sum(rounds) < alone_calls[0]


def test_batches_keep_prompts_of_different_lengths_apart() -> None:
    """Padding a 4K prompt to 8K wastes a third of the batch: the padding bound splits the lengths,
    while short items with a few hundred tokens of padding still share a batch."""
    from qkrestore.evaluate.scoring import PADDING_FREE, plan_batches

    widths = [8192] * 3 + [4096] * 3
    assert list(plan_batches(range(6), widths, None, 64, 10**9, 1 << 62)) == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    short = [400, 300, 200, 120, 100]
    assert sum(short[0] - w for w in short) < PADDING_FREE
    assert list(plan_batches(range(5), short, None, 64, 10**9, 1 << 62)) == [[0, 1, 2, 3, 4]]
    # widths within an eighth of each other share a batch however long they are
    near = [8192, 8000, 7600]
    assert list(plan_batches(range(3), near, None, 64, 10**9, 1 << 62)) == [[0, 1, 2]]
