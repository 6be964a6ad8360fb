"""A toy stand-in for the real model: a tiny random Llama with a word-level tokenizer and a chat
template, so that run.py and report.py can be exercised end to end on a CPU in seconds (the test
does; ``python scripts/reproduce/real/toy.py DIR`` writes one). It learns nothing worth reporting.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import traces  # noqa: E402

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer() -> object:
    """Word-level over the NIAH texts and the traces; digits one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qkrestore.evaluate import niah as nh

    texts = [
        nh.TEMPLATE,
        nh.ANSWER_PREFIX,
        nh.NEEDLE,
        nh.NOISE,
        traces.INSTRUCTION,
        "Add Answer + =",
    ]
    texts += [*nh.essay_sentences(random.Random(0), 400), " ".join(map(str, range(10)))]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    specials = ["[UNK]", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )  # fmt: skip
    out.chat_template = CHAT
    return out


def build(root: Path, layers: int = 3, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qkrestore.io.runtime import quiet_transformers

    quiet_transformers()
    tok = tokenizer()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))  # type: ignore[attr-defined]
    return root


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
