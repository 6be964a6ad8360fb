"""The SmolLM2 → Qwen3.5-text hybrid scripts (scripts/hybrid/) at toy size on the CPU.

A tiny random Llama (transformers' LlamaConfig, tied embeddings, GQA, norms away from 1) stands in
for SmolLM2. Checked: the converted config's layer_types; kept tensors byte for byte (embeddings,
MLPs) and the norms exactly in Qwen3.5's ``1 + w`` form; the softmax layers' q/k/v/o layout; that
with the q/k norms bypassed the all-softmax conversion computes the Llama's logits (so RoPE, the
gate and o_proj doubling are right); the q/k-norm calibration against an independent computation;
``qkrestore inspect-layers --json``; that distillation lowers the KL on a fixed batch and leaves
frozen tensors alone; and that ``qkrestore merge`` on (hybrid PRE, hybrid after one SFT step)
restores exactly the softmax layers' routing rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import FULL, LIN, assert_merged, load_all, raw, routing_rows

from qkrestore.io.runtime import quiet_transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "hybrid"))
import convert  # noqa: E402
import distill  # noqa: E402

HEADS, KV, HD, HIDDEN, LAYERS, VOCAB = 2, 1, 16, 32, 4, 99
FULL_LAYERS = [1, 3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with sharp enough logits that KL moves measurably."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, max_position_embeddings=512,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("llama") / "src"
    model.save_pretrained(root)
    (root / "chat_template.jinja").write_text("{{ messages }}")
    return root


def calib_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hybrid(llama: Path) -> Path:
    out = llama.parent / "hybrid"
    convert.convert(
        llama, out, full_layers=FULL_LAYERS, calib_ids=calib_ids(), calibrate_outputs=True
    )
    return out


def test_config_and_kept_tensors(llama: Path, hybrid: Path) -> None:
    cfg = json.loads((hybrid / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_text"
    assert cfg["architectures"] == ["Qwen3_5ForCausalLM"]
    assert cfg["layer_types"] == [LIN, FULL, LIN, FULL]
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True
    # Side files (tokenizer, chat template) travel byte for byte, so the hybrid is a drop-in PRE.
    assert (hybrid / "chat_template.jinja").read_bytes() == (
        llama / "chat_template.jinja"
    ).read_bytes()

    src, _ = load_all(llama)
    got, _ = load_all(hybrid)
    assert "lm_head.weight" not in got  # tied, as in the source
    kept = ["model.embed_tokens.weight"] + [
        f"model.layers.{i}.mlp.{m}.weight"
        for i in range(LAYERS)
        for m in ("gate_proj", "up_proj", "down_proj")
    ]
    for name in kept:
        assert raw(got[name]) == raw(src[name]), name
    norms = [n for n in src if n.endswith("norm.weight")]
    assert len(norms) == 2 * LAYERS + 1
    for name in norms:  # Qwen3.5 multiplies by (1 + w): exact in float32
        assert torch.equal(1.0 + got[name], src[name]), name
    for i in FULL_LAYERS:
        p = f"model.layers.{i}.self_attn."
        q = got[p + "q_proj.weight"].view(HEADS, 2 * HD, HIDDEN)
        assert raw(q[:, :HD].reshape(-1, HIDDEN)) == raw(src[p + "q_proj.weight"])
        assert not q[:, HD:].any()  # gate rows zero: sigmoid(0) = 1/2 ...
        assert torch.equal(
            got[p + "o_proj.weight"], 2 * src[p + "o_proj.weight"]
        )  # ... undone here
        for x in ("k_proj", "v_proj"):
            assert raw(got[p + f"{x}.weight"]) == raw(src[p + f"{x}.weight"])
    for i in (0, 2):
        p, s = f"model.layers.{i}.linear_attn.", f"model.layers.{i}.self_attn."
        qkv = got[p + "in_proj_qkv.weight"]
        k_rep = src[s + "k_proj.weight"].repeat(HEADS // KV, 1)  # one KV head here: plain repeat
        v_rep = src[s + "v_proj.weight"].repeat(HEADS // KV, 1)
        assert raw(qkv) == raw(torch.cat([src[s + "q_proj.weight"], k_rep, v_rep]))
        assert raw(got[p + "out_proj.weight"]) == raw(src[s + "o_proj.weight"])
        assert not got[p + "in_proj_a.weight"].any() and not got[p + "in_proj_b.weight"].any()
        conv = got[p + "conv1d.weight"]
        assert torch.equal(conv[:, 0, -1], torch.ones(conv.shape[0])) and not conv[:, 0, :-1].any()


def test_all_softmax_conversion_computes_the_llama(llama: Path, tmp_path: Path) -> None:
    """With every layer softmax and Qwen3.5's q/k norms bypassed, the hybrid is the Llama."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "all-full"
    convert.convert(llama, out, full_layers=list(range(LAYERS)), calib_tokens=0)
    src = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    hyb = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = calib_ids()
    with torch.no_grad():
        want = src(input_ids=ids).logits
        got_normed = hyb(input_ids=ids).logits
        for layer in hyb.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
        got = hyb(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got_normed, want, atol=1e-3)  # the norms are the one difference


def test_qk_norm_calibration(llama: Path, hybrid: Path) -> None:
    """1 + q_norm = mean per-head RMS of the Llama's queries, computed here from hidden states."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    got, _ = load_all(hybrid)
    with torch.no_grad():
        hs = model(input_ids=calib_ids(), output_hidden_states=True).hidden_states
        for i in FULL_LAYERS:
            layer = model.model.layers[i]
            x = layer.input_layernorm(hs[i])
            for side in ("q", "k"):
                proj = getattr(layer.self_attn, f"{side}_proj").weight
                rms = (x @ proj.T).view(*x.shape[:-1], -1, HD).pow(2).mean(-1).sqrt().mean()
                stored = got[f"model.layers.{i}.self_attn.{side}_norm.weight"]
                torch.testing.assert_close(
                    1.0 + stored, torch.full((HD,), float(rms)), rtol=1e-5, atol=1e-6
                )


def test_output_scales_are_least_squares(llama: Path, hybrid: Path) -> None:
    """After calibration, each DeltaNet layer's best scale against its target is 1 (the residual
    of the teacher's attention output is orthogonal to the layer's output), and it was not before."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    hyb = AutoModelForCausalLM.from_pretrained(hybrid, dtype=torch.float32)
    rec = json.loads((hybrid / "conversion.json").read_text())
    assert sorted(int(k) for k in rec["output_scales"]) == [0, 2]
    taps = distill.AttentionTaps(teacher)
    with torch.no_grad():
        teacher.model(input_ids=calib_ids())
        for i in (0, 2):
            y = hyb.model.layers[i].linear_attn(hidden_states=taps.inputs[i])
            t = taps.outputs[i]
            assert float((y * t).sum() / (y * y).sum()) == pytest.approx(1.0, rel=1e-4)
            assert float(hyb.model.layers[i].linear_attn.norm.weight[0]) == pytest.approx(
                rec["output_scales"][str(i)], rel=1e-6
            )
            assert rec["output_scales"][str(i)] != pytest.approx(1.0, rel=1e-3)
    taps.remove()


def test_inspect_layers_reports_the_softmax_layers(hybrid: Path, cli) -> None:
    res = cli("inspect-layers", hybrid, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["model_type"] == "qwen3_5_text"
    assert doc["global_layers"] == FULL_LAYERS
    assert doc["local_layers"] == []


def distilled(llama: Path, hybrid: Path, out: Path) -> tuple[Path, dict]:
    teacher, student = distill.load_pair(llama, hybrid, torch.device("cpu"))
    # Two windows of 32 tokens and a batch of 2: every step sees the fixed batch the KL is measured on.
    train = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(2))
    fixed = train.view(2, 32)
    rec = distill.distill(
        teacher, student, train, fixed, seq_len=32, batch=2,
        stage1=distill.StageConfig(steps=4, seconds=1e9, lr=1e-2, warmup=1),
        stage2=distill.StageConfig(steps=4, seconds=1e9, lr=3e-3, warmup=1),
        hidden_weight=0.1, seed=0, log_every=1,
    )  # fmt: skip
    distill.save_student(student, hybrid, out, torch.float32)
    return out, rec


@pytest.fixture(scope="module")
def pre(llama: Path, hybrid: Path) -> tuple[Path, dict]:
    return distilled(llama, hybrid, llama.parent / "pre")


def test_distillation_lowers_kl_and_freezes_the_rest(hybrid: Path, pre: tuple[Path, dict]) -> None:
    folder, rec = pre
    assert rec["stage1"]["steps"] == 4 and rec["stage2"]["steps"] == 4
    assert rec["tokens"] == 8 * 2 * 32
    assert rec["kl_after"] < rec["kl_before"]
    losses1 = [loss for _, loss in rec["stage1"]["losses"]]
    assert len(losses1) == 4 and losses1[-1] < losses1[0]  # attention transfer fits its targets
    before, _ = load_all(hybrid)
    after, _ = load_all(folder)
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {
        n for n in before if ".linear_attn." in n or n.endswith(("q_norm.weight", "k_norm.weight"))
    }
    assert changed <= trainable
    assert {n for n in changed if ".linear_attn." in n}  # the DeltaNet layers did train
    assert (folder / "chat_template.jinja").exists()


def test_merge_restores_the_softmax_routing_after_one_sft_step(
    pre: tuple[Path, dict], tmp_path: Path, cli
) -> None:
    """One SFT step on every parameter (POST), then ``qkrestore merge PRE POST``."""
    from transformers import AutoModelForCausalLM

    pre_dir = pre[0]
    model = AutoModelForCausalLM.from_pretrained(pre_dir, dtype=torch.float32)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    post = tmp_path / "post"
    model.save_pretrained(post)
    out = tmp_path / "out"
    res = cli("merge", pre_dir, post, "-o", out, "--json", "--quiet")
    assert res.code == 0, res.err
    assert sorted(json.loads(res.out)["plan"]["layers"]) == FULL_LAYERS
    names = load_all(post)[0]
    for i in FULL_LAYERS:  # the SFT step moved the routing rows that merge must bring back
        n = f"model.layers.{i}.self_attn.k_proj.weight"
        assert not torch.equal(names[n], load_all(pre_dir)[0][n])
    expected = routing_rows(names, FULL_LAYERS, gated_heads=(HEADS, HD))
    assert set(expected) == {
        f"model.layers.{i}.self_attn.{t}.weight"
        for i in FULL_LAYERS
        for t in ("q_proj", "k_proj", "q_norm", "k_norm")
    }
    assert_merged(out, pre_dir, post, expected)
