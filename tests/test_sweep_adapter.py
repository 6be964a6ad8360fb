"""``sweep`` with a PEFT adapter as POST: swept as PRE + adapter, merged whole.

The reference is independent: the same sweep on a POST that peft itself merged
(``merge_and_unload``) and saved must give the same numbers for every candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_fixtures import build_adapter, build_base, load_base

pytest.importorskip("peft")

LLAMA = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMA |= {"head_dim": 8, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from peft import PeftModel

    root = tmp_path_factory.mktemp("sweep-adapter")
    pre = build_base(root, "llama", LLAMA)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapter = build_adapter(pre, root / "lora", r=4, lora_alpha=8, target_modules=targets)
    merged = PeftModel.from_pretrained(load_base(pre), adapter).merge_and_unload()
    merged.save_pretrained(root / "peft-post")
    return pre, adapter, root / "peft-post"


def items(path: Path, seed: int) -> Path:
    """Prompts and answers as token ids (no tokenizer needed), a few of each."""
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as fh:
        for _ in range(4):
            prompt = torch.randint(4, 99, (12,), generator=g).tolist()
            answer = torch.randint(4, 99, (3,), generator=g).tolist()
            fh.write(json.dumps({"prompt": prompt, "answer": answer, "group": 12}) + "\n")
    return path


def test_adapter_post_is_swept_as_the_merged_model(models, tmp_path: Path, cli) -> None:
    pre, adapter, peft_post = models
    recall, reasoning = items(tmp_path / "recall.jsonl", 1), items(tmp_path / "cot.jsonl", 2)
    common = ["--candidates", "pre,post,restore,ablations,pro", "--ridges", "1", "--recall"]
    common += [recall, "--reasoning", reasoning, "--reasoning-metric", "loglik"]
    common += ["--device", "cpu", "--json", "--quiet"]
    ours = cli("sweep", pre, adapter, *common)
    assert ours.code == 0, ours.err
    ref = cli("sweep", pre, peft_post, *common)
    assert ref.code == 0, ref.err
    a, b = json.loads(ours.out), json.loads(ref.out)
    assert a["post_is_adapter"] is True and a["post"] == str(adapter)
    assert [r["name"] for r in a["candidates"]] == [r["name"] for r in b["candidates"]]
    post_ll = next(r for r in a["candidates"] if r["name"] == "post")["reasoning"]["loglik"]
    pre_ll = next(r for r in a["candidates"] if r["name"] == "pre")["reasoning"]["loglik"]
    assert post_ll != pytest.approx(pre_ll, abs=1e-6)  # the adapter changes the model
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["reasoning"]["loglik"] == pytest.approx(y["reasoning"]["loglik"], rel=1e-5)
        assert x["recall"] == y["recall"], x["name"]
