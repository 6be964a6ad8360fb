"""``attn-locality``: local mass and needle weight, checked where the answer is known by construction.

* hand-made attention maps: a band of width w, uniform attention, a head that looks only at the
  needle; the measures against explicit loops written from their definitions;
* a tiny Qwen2 whose layer 1 is a sliding-window layer of width 8: its local mass with k = 8 must
  read 1 (the mask allows nothing else), while the global layer 0 reads near the uniform value;
* a tiny Llama whose layer-0 head 0 is built to attend to the needle tokens (a marker feature in
  their embeddings, read by W_K along a RoPE pair that barely rotates): its needle weight must read
  about 1 while the untouched head reads the uniform value; both checked against the weights
  transformers returns with ``output_attentions=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import quiet_transformers
from test_diagnostics import check_png, word_tokenizer

from qkrestore.diagnostics import locality as lc
from qkrestore.errors import QKRestoreError
from qkrestore.evaluate import niah as nh


def band(n: int, w: int) -> torch.Tensor:
    """Each query spreads its weight evenly over its last ``w`` tokens (itself included)."""
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        lo = max(0, i - w + 1)
        a[i, lo : i + 1] = 1.0 / (i + 1 - lo)
    return a


def uniform(n: int) -> torch.Tensor:
    return band(n, n)


def local_loop(a: torch.Tensor, k: int) -> float:
    n = a.shape[0]
    rows = [sum(float(a[i, j]) for j in range(i - k + 1, i + 1)) for i in range(k, n)]
    return sum(rows) / len(rows)


def test_local_mass_on_hand_made_maps() -> None:
    n = 40
    maps = torch.stack([band(n, 8), band(n, 3), uniform(n)])
    got = lc.local_mass(maps, 8).tolist()
    assert got[0] == pytest.approx(1.0, abs=1e-12)  # width 8, k = 8: all of it
    assert got[1] == pytest.approx(1.0, abs=1e-12)  # narrower than k
    assert got[2] == pytest.approx(lc.uniform_local(n, 8), abs=1e-12)
    assert got[2] < 0.5
    for k in (1, 5, 8, 20):
        for h in range(3):
            assert lc.local_mass(maps, k)[h].item() == pytest.approx(local_loop(maps[h], k))
    with pytest.raises(QKRestoreError, match="--last-k"):
        lc.local_mass(maps, n)


def test_span_weight_on_hand_made_maps() -> None:
    n, needle, question = 30, (10, 14), (24, 30)
    looking = uniform(n)
    looking[question[0] :] = 0.0
    looking[question[0] :, needle[0] : needle[1]] = 0.25  # every question token: needle only
    maps = torch.stack([looking, uniform(n)])
    got = lc.span_weight(maps, question, needle).tolist()
    assert got[0] == pytest.approx(1.0)
    want = sum(4 / (q + 1) for q in range(24, 30)) / 6
    assert got[1] == pytest.approx(want) and lc.uniform_span(question, needle) == pytest.approx(
        want
    )


# -- a sliding-window layer reads as local ---------------------------------------------------------


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Qwen2: layer 0 global, layer 1 a sliding window of 8; a word tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    quiet_transformers()
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    out = tmp_path_factory.mktemp("sliding") / "qwen2-swa"
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_sliding_window_layer_reads_local(cli, sliding_model: Path) -> None:
    res = cli(
        "attn-locality", sliding_model, "--length", "256", "--samples", "2", "--last-k", "8",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["source"] == "niah:single-2" and len(doc["prompts"]) == 2
    layers = {x["layer"]: x for x in doc["models"][0]["layers"]}
    assert layers[1]["kind"] == "local" and layers[0]["kind"] == "global"
    for h in layers[1]["local_mass"]["heads"]:
        assert h == pytest.approx(1.0, abs=1e-5)  # the window allows nothing else
    uni = doc["uniform"]["local_mass"]
    assert uni < 0.15
    for h in layers[0]["local_mass"]["heads"]:
        assert h < 0.3  # random small weights: close to uniform, far from 1
    # A wider window than k: the same layer no longer reads all-local.
    res = cli(
        "attn-locality", sliding_model, "--length", "256", "--samples", "1", "--last-k", "4",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    layer1 = json.loads(res.out)["models"][0]["layers"][1]
    assert max(layer1["local_mass"]["heads"]) < 0.9


def test_niah_prompt_spans_hold_the_needle() -> None:
    tok = word_tokenizer()  # word-level: the spans can be read back word by word
    for p in lc.niah_prompts(tok, 300, 3, task="single-1", seed=1):
        assert p.needle is not None and p.question is not None
        assert p.ids.numel() <= 300 and p.question[1] == p.ids.numel()
        needle = tok.convert_ids_to_tokens(p.ids[p.needle[0] : p.needle[1]].tolist())
        assert needle[:7] == ["One", "of", "the", "special", "magic", "numbers", "for"]
        assert needle[-1] == "."
        asked = tok.convert_ids_to_tokens(p.ids[p.question[0] :].tolist())
        assert asked[:3] == ["What", "is", "the"] and asked[-1] == "is"


def test_text_windows_and_plot(cli, sliding_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "essay.txt"
    text.write_text(" ".join(nh.essay_sentences(__import__("random").Random(3), 200)))
    png = tmp_path / "loc.png"
    res = cli(
        "attn-locality", sliding_model, sliding_model, "--text", text, "--length", "128",
        "--samples", "3", "--last-k", "8", "--device", "cpu", "--plot", png, "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert [p["tokens"] for p in doc["prompts"]] == [128, 128, 128]
    assert all(p["needle"] is None for p in doc["prompts"])
    assert doc["uniform"]["needle_weight"] is None
    assert all(x["needle_weight"] is None for x in doc["models"][0]["layers"])
    # Same model twice: nothing changes.
    cmp = doc["comparisons"][0]["layers"]
    assert all(r["local_mass"]["mean_change"] == 0 for r in cmp)
    check_png(png)
    bad = cli("attn-locality", sliding_model, "--length", "128", "--last-k", "500")
    assert bad.code != 0 and "--last-k 500" in bad.err


# -- a head built to look at the needle ------------------------------------------------------------

VOCAB, HIDDEN, HEAD_DIM, NEEDLE_IDS = 64, 32, 16, range(48, 64)


@pytest.fixture(scope="module")
def needle_head_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Llama layer, two heads. Every token's embedding has a constant feature (dim 0); needle
    tokens (ids 48..63) also a marker (dim 1). Head 0 reads the constant into its query and the
    marker into its key, on dims 7 and 15: RoPE's slowest pair, which at rope_theta 1e9 turns by
    under 1e-5 rad over the prompt, so the score is ~28 for needle keys and 0 for all others. Head 1
    has zero W_Q: uniform attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
    )
    model = LlamaForCausalLM(cfg)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = torch.zeros(VOCAB, HIDDEN)
        emb[:, 0] = 1.0
        emb[list(NEEDLE_IDS), 1] = 1.0
        emb[:, 2:] = 0.01 * torch.randn(VOCAB, HIDDEN - 2)
        model.model.embed_tokens.weight.copy_(emb)
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.q_proj.weight[7, 0] = 1.0
        attn.k_proj.weight[7, 1] = 5.0
    out = tmp_path_factory.mktemp("needle") / "llama-needle"
    model.save_pretrained(out)
    return out


def test_needle_head_reads_one(needle_head_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 48, (200,), generator=g)
    ids[90:98] = torch.arange(48, 56)
    prompt = lc.LocalityPrompt(ids, "constructed", needle=(90, 98), question=(192, 200))
    report = lc.locality_report(
        [needle_head_model], [prompt], "constructed", 16, torch.device("cpu")
    )
    run = report.models[0]
    assert run.capture == "hooks"
    assert run.needle[0][0] > 0.99  # head 0 looks at the needle
    assert run.needle[0][1] == pytest.approx(report.uniform["needle_weight"], abs=0.02)
    # The same numbers from the weights transformers returns, summed by hand.
    model = AutoModelForCausalLM.from_pretrained(needle_head_model, attn_implementation="eager")
    with torch.no_grad():
        a = model(input_ids=ids[None], output_attentions=True).attentions[0][0].double()
    for h in range(2):
        per_q = [float(a[h, q, 90:98].sum()) for q in range(192, 200)]
        assert run.needle[0][h] == pytest.approx(sum(per_q) / 8, abs=1e-6)
        assert run.local[0][h] == pytest.approx(local_loop(a[h], 16), abs=1e-6)
