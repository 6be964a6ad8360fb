"""`qkrestore select-layers` (the paper's Appendix M) on a model where one layer is decisive by
construction: a 4-layer Llama whose weights are set by hand so that only layer 2's attention can
look the answer up. Its ranking must put layer 2 first, and the recipe it writes must round-trip
through `merge --config`.

The task (token ids, no tokenizer): a context of filler tokens holds one *needle* value token N_j,
three copies of a *distractor* D_k of another value and a few single distractors; the model must
answer N_j after a question token. Layer 2, head 0 queries with a constant feature and keys on the
needle flag, so it attends to the needle and copies its value into the residual stream, which the
LM head reads. Zeroing its W_Q makes that attention uniform: the residual then holds the value
counts of the whole context, and the most frequent value (the triple distractor) wins: recall
falls from 1 to 0. The other layers attend (randomly) and have MLPs, but write only into filler
dimensions that the LM head ignores, so ablating them changes nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_all, raw

from qkrestore.io.runtime import quiet_transformers

N_VALUES, N_FILL = 8, 20
NEEDLE0, DISTRACT0, FILL0, QUESTION, BOS = 4, 12, 20, 3, 1
VOCAB = FILL0 + N_FILL
D = 32  # dims 0..7 value one-hot, 8 needle flag, 9 constant, 10 question flag, 11..30 fillers
DECISIVE = 2


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=1e6,  # the content pair (dims 7, 15) then rotates by < 1e-3 rad over 100 tokens
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    fill = slice(11, 11 + N_FILL)
    with torch.no_grad():
        emb = torch.zeros(VOCAB, D)
        emb[:, 9] = 1.0  # the constant feature
        for j in range(N_VALUES):
            emb[NEEDLE0 + j, j] = emb[NEEDLE0 + j, 8] = 1.0
            emb[DISTRACT0 + j, j] = 1.0
        for f in range(N_FILL):
            emb[FILL0 + f, 11 + f] = 1.0
        emb[QUESTION, 10] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(VOCAB, D)
        for j in range(N_VALUES):
            head[NEEDLE0 + j, j] = 10.0
        model.lm_head.weight.copy_(head)
        for i, layer in enumerate(model.model.layers):
            at, mlp = layer.self_attn, layer.mlp
            for p in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.down_proj):
                p.weight.zero_()
            if i == DECISIVE:
                at.q_proj.weight[7, 9] = 3.0  # head 0 asks with the constant feature …
                at.k_proj.weight[7, 8] = 3.0  # … and only the needle answers
                at.v_proj.weight[0:N_VALUES, 0:N_VALUES] = torch.eye(N_VALUES)
                at.o_proj.weight[0:N_VALUES, 0:N_VALUES] = 3.0 * torch.eye(N_VALUES)
            else:  # attend somewhere, write only filler dimensions
                at.q_proj.weight.copy_(torch.randn(32, D, generator=g))
                at.k_proj.weight.copy_(torch.randn(32, D, generator=g))
                at.v_proj.weight[:, fill] = 0.1 * torch.randn(32, N_FILL, generator=g)
                at.o_proj.weight[fill, :] = 0.1 * torch.randn(N_FILL, 32, generator=g)
            mlp.down_proj.weight[fill, :] = 0.2 * torch.randn(N_FILL, 16, generator=g)
    return model


def task_items(n: int, length: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        j, k, *singles = rng.sample(range(N_VALUES), 5)
        ctx = [FILL0 + rng.randrange(N_FILL) for _ in range(length)]
        slots = rng.sample(range(length), 7)
        ctx[slots[0]] = NEEDLE0 + j
        for s in slots[1:4]:
            ctx[s] = DISTRACT0 + k
        for s, m in zip(slots[4:], singles):
            ctx[s] = DISTRACT0 + m
        items.append({"prompt": [BOS, *ctx, QUESTION], "answer": [NEEDLE0 + j], "length": length})
    return items


def accuracy(model, items: list[dict]) -> float:
    hits = 0
    with torch.inference_mode():
        for it in items:
            out = model(input_ids=torch.tensor([it["prompt"]])).logits[0, -1].argmax()
            hits += int(out) == it["answer"][0]
    return hits / len(items)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def decisive(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model folder, a perturbed copy as POST, the recall file)."""
    root = tmp_path_factory.mktemp("decisive")
    model = build_model()
    items = task_items(12, 40, 1) + task_items(12, 80, 2)
    # the construction, checked with plain torch: recall is perfect, and zeroing layer 2's W_Q
    # (and only that) destroys it
    assert accuracy(model, items) == 1.0
    for i, layer in enumerate(model.model.layers):
        saved = layer.self_attn.q_proj.weight.detach().clone()
        with torch.no_grad():
            layer.self_attn.q_proj.weight.zero_()
        assert accuracy(model, items) == (0.0 if i == DECISIVE else 1.0), i
        with torch.no_grad():
            layer.self_attn.q_proj.weight.copy_(saved)
    model.save_pretrained(root / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "post")
    recall = root / "recall.jsonl"
    recall.write_text("".join(json.dumps(x) + "\n" for x in items))
    return root / "model", root / "post", recall


def test_decisive_layer_ranks_first(decisive, tmp_path: Path, cli) -> None:
    model, post, recall = decisive
    recipe = tmp_path / "top1.yaml"
    res = cli(
        "select-layers", model, "--recall", recall, "--top", "1", "--write-recipe", recipe,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["layers"] == [0, 1, 2, 3] and doc["retrieval"] == "recall-file"
    assert doc["unablated_score"] == 1.0
    assert doc["unablated"]["recall"] == {"40": 1.0, "80": 1.0}
    first, *rest = doc["ranking"]
    assert first["layer"] == DECISIVE and first["rank"] == 1 and first["drop"] == 1.0
    assert all(r["drop"] == 0.0 for r in rest)
    assert [r["layer"] for r in rest] == [0, 1, 3]  # equal drops: lower layer first
    assert doc["top"] == [DECISIVE]
    # the recipe round-trips through merge --config: the plan restores exactly that layer
    assert yaml.safe_load(recipe.read_text()) == {"layers": [DECISIVE], "targets": ["q", "k"]}
    out = tmp_path / "out"
    m = cli("merge", model, post, "-o", out, "--config", recipe, "--json")
    assert m.code == 0, m.err
    assert json.loads(m.out)["layers"] == [DECISIVE]
    got, _ = load_all(out)
    pre_t, _ = load_all(model)
    post_t, _ = load_all(post)
    for n, t in got.items():
        restored = n.startswith(f"model.layers.{DECISIVE}.self_attn.") and (
            "q_proj" in n or "k_proj" in n
        )
        assert raw(t) == raw(pre_t[n] if restored else post_t[n]), n


def test_table_and_errors(decisive, tmp_path: Path, cli) -> None:
    model, _, recall = decisive
    res = cli("select-layers", model, "--recall", recall, "--layers", "1,2", "--device", "cpu")
    assert res.code == 0, res.err
    lines = [x for x in res.out.splitlines() if "│" in x]
    body = [[c.strip() for c in x.split("│")[1:-1]] for x in lines]  # rows (the header uses ┃)
    assert body[0][:2] == ["1", str(DECISIVE)] and body[0][4] == "1.000"
    r = cli("select-layers", model, "--recall", recall, "--write-recipe", tmp_path / "x.yaml")
    assert r.code == 2 and "--top" in r.err and len(r.err_lines) == 1
    r = cli("select-layers", model, "--recall", recall, "--layers", "7", "--device", "cpu")
    assert r.code == 2 and "layer 7 does not exist" in r.err
    r = cli("select-layers", model, "--device", "cpu", "--lengths", "128", "--samples", "1")
    assert r.code == 2 and "tokenizer" in r.err and len(r.err_lines) == 1


def test_ablation_zeroes_only_query_rows_of_a_gated_projection(tmp_path: Path) -> None:
    """Qwen3-Next's q_proj holds, per head, 16 query rows then 16 output-gate rows: the ablation
    zeroes the query rows only (and undoes itself)."""
    from conftest import QWEN3_NEXT, build_hf_pair
    from transformers import AutoModelForCausalLM

    from qkrestore.evaluate.candidates import ModelPatcher, ablation_values
    from qkrestore.io.checkpoint import Checkpoint
    from qkrestore.surgery.plan import PlanOptions, build_plan

    _, post = build_hf_pair(tmp_path, "qwen3_next", QWEN3_NEXT)
    model = AutoModelForCausalLM.from_pretrained(str(post), dtype=torch.float32)
    q = model.model.layers[3].self_attn.q_proj.weight
    before = q.detach().clone()
    with Checkpoint.open(post) as ck:
        plan = build_plan(ck, ck, PlanOptions(layers=[3], targets=("q",)))
    patcher = ModelPatcher(model)
    patcher.apply(plan, ablation_values(plan))
    heads = q.detach().view(2, 2, 16, -1)  # (head, query|gate, row, d)
    assert torch.count_nonzero(heads[:, 0]) == 0
    assert torch.equal(heads[:, 1], before.view(2, 2, 16, -1)[:, 1])
    other = model.model.layers[1].self_attn.q_proj.weight
    assert torch.count_nonzero(other) == other.numel()
    patcher.reset()
    assert torch.equal(q.detach(), before)
