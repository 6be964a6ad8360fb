"""Tiny random models from transformers' own config classes: the demo's pair and the tests' fixtures.

One builder serves ``qkrestore demo`` and the test suite, so the model the demo shows a new user is
the one the tests check.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.runtime import quiet_transformers

TINY: dict[str, Any] = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
LIN, FULL = "linear_attention", "full_attention"
QWEN3_NEXT: dict[str, Any] = {
    "num_hidden_layers": 4,
    "head_dim": 16,
    "hidden_act": "silu",
    "layer_types": [LIN, FULL, LIN, FULL],
    "linear_conv_kernel_dim": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 12,
    "shared_expert_intermediate_size": 12,
}


def build_pair(
    root: Path,
    model_type: str,
    kwargs: Mapping[str, Any],
    *,
    seed: int = 0,
    noise: float = 0.01,
    shard: str | None = "40KB",
    vlm: bool = False,
) -> tuple[Path, Path]:
    """PRE, freshly initialised, and POST = PRE + Gaussian noise on every parameter (as a fine-tune
    would drift it), saved in shards of ``shard`` (``None``: one file). ``kwargs`` are added to
    :data:`TINY`, or are the whole config for a VLM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    quiet_transformers()
    torch.manual_seed(seed)
    if vlm:
        config = AutoConfig.for_model(model_type, **kwargs)
        model = AutoModelForImageTextToText.from_config(config)
    else:
        config = AutoConfig.for_model(model_type, **(TINY | dict(kwargs)))
        model = AutoModelForCausalLM.from_config(config)
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    if shard:
        model.save_pretrained(post, max_shard_size=shard)
    else:
        model.save_pretrained(post)
    return pre, post


def example_texts() -> list[str]:
    """Prompts and answers of the shipped reasoning example (``--reasoning example``)."""
    from ..evaluate.runner import example_reasoning_file

    out: list[str] = []
    for line in example_reasoning_file().read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            out += [str(doc["prompt"]), str(doc["answer"])]
    return out


def word_tokenizer(extra: Sequence[str] = ()) -> Any:
    """A word-level tokenizer trained on the NIAH probe's own text (and ``extra``), so that tiny
    models can run the probe: digits stay unknown, so they answer nothing right, which costs the
    probe's machinery nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..evaluate import niah as nh

    texts = [nh.TEMPLATE, nh.ANSWER_PREFIX, nh.NEEDLE, nh.NOISE]
    texts += nh.essay_sentences(random.Random(0), 300)
    texts += list(extra)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tokenizer_sized(tok: Any, context: int) -> dict[str, Any]:
    """Config keys that fit a tiny model to ``tok`` and a context of ``context`` tokens."""
    return {
        "vocab_size": len(tok),
        "max_position_embeddings": context,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
