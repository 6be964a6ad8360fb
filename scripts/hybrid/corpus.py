"""Distillation text without the internet: the documentation and licence text of installed packages,
topped up with their Python source when that is not enough, and optionally text the teacher writes.

Deterministic for a given set of installed packages: files are read in sorted order, duplicates
(the same licence shipped by twenty packages) are dropped by content hash, and a file goes to the
held-out split by a hash of its path inside site-packages, never by position. The record says how
many files and tokens of each kind were used and a sha256 of the token stream, so two machines can
tell whether they trained on the same text.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PROSE_SUFFIXES = (".md", ".rst", ".txt")
PROSE_NAMES = ("LICENSE", "LICENCE", "METADATA", "COPYING", "NOTICE", "README")
MIN_BYTES, MAX_BYTES = 1_000, 300_000


@dataclass
class Corpus:
    """Token streams (1-D) for training and held-out evaluation, and what they were made of."""

    train: torch.Tensor
    held_out: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)


def package_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()}
    return sorted(r for r in roots if r.is_dir())


def _is_prose(p: Path) -> bool:
    return p.suffix.lower() in PROSE_SUFFIXES or p.name.upper().startswith(PROSE_NAMES)


def text_files(roots: Sequence[Path], kind: str) -> Iterator[tuple[str, Path]]:
    """``(relative name, path)`` of the files of ``kind`` ('prose' or 'code') under ``roots``."""
    for root in roots:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.is_symlink():
                continue
            ok = _is_prose(p) if kind == "prose" else p.suffix == ".py"
            if not ok:
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if MIN_BYTES <= size <= MAX_BYTES:
                yield str(p.relative_to(root)), p


def held_out_file(name: str, every: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


def build_corpus(
    tokenizer: Any,
    *,
    train_tokens: int,
    held_out_tokens: int,
    held_out_every: int = 20,
    roots: Sequence[Path] | None = None,
    extra_texts: Sequence[str] = (),
) -> Corpus:
    """Prose first (all of it), then Python source until ``train_tokens`` is reached.

    ``extra_texts`` (e.g. the teacher's own samples) go into the training stream first. Each
    document ends with the tokenizer's EOS token.
    """
    roots = list(roots) if roots is not None else package_roots()
    eos = tokenizer.eos_token_id
    seen: set[str] = set()
    train: list[int] = []
    held: list[int] = []
    counts = {"prose_files": 0, "code_files": 0, "generated_texts": 0, "held_out_files": 0}
    prose_tokens = code_tokens = generated_tokens = 0

    def ids(text: str) -> list[int]:
        return [*tokenizer(text, add_special_tokens=False).input_ids, eos]

    for text in extra_texts:
        t = ids(text)
        train += t
        generated_tokens += len(t)
        counts["generated_texts"] += 1
    for kind in ("prose", "code"):
        if kind == "code" and len(train) >= train_tokens and len(held) >= held_out_tokens:
            break
        for name, path in text_files(roots, kind):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            to_held = held_out_file(name, held_out_every)
            if to_held and len(held) >= held_out_tokens:
                continue
            if not to_held and len(train) >= train_tokens:
                if len(held) >= held_out_tokens:
                    break
                continue
            t = ids(text)
            if to_held:
                held += t
                counts["held_out_files"] += 1
            else:
                train += t
                counts[f"{kind}_files"] += 1
                if kind == "prose":
                    prose_tokens += len(t)
                else:
                    code_tokens += len(t)
    tr = torch.tensor(train[:train_tokens], dtype=torch.long)
    ho = torch.tensor(held[:held_out_tokens], dtype=torch.long)
    record = {
        **counts,
        "prose_tokens": prose_tokens,
        "code_tokens": code_tokens,
        "generated_tokens": generated_tokens,
        "train_tokens": int(tr.numel()),
        "held_out_tokens": int(ho.numel()),
        "train_sha256": hashlib.sha256(tr.numpy().tobytes()).hexdigest(),
        "held_out_sha256": hashlib.sha256(ho.numpy().tobytes()).hexdigest(),
        "roots": [str(r) for r in roots],
    }
    return Corpus(tr, ho, record)


def batches(stream: torch.Tensor, seq_len: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch, seq_len]`` windows of the stream, in a seeded order, epoch after epoch."""
    n = stream.numel() // seq_len
    if n < 1:
        raise ValueError(
            f"corpus of {stream.numel()} tokens is shorter than one {seq_len}-token window"
        )
    windows = stream[: n * seq_len].view(n, seq_len)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            idx = order[s : s + batch]
            if idx.numel() < batch:  # fewer windows than one batch: repeat them
                idx = idx.repeat(-(-batch // idx.numel()))[:batch]
            yield windows[idx]


@torch.no_grad()
def teacher_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int,
    device: torch.device,
) -> list[str]:
    """The teacher's own sampled continuations (temperature 1, top-p 0.95) of chat-formatted prompts."""
    torch.manual_seed(seed)
    texts = []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if getattr(tokenizer, "chat_template", None)
        else p
        for p in prompts
    ]
    for s in range(0, len(chats), 32):
        enc = tokenizer(
            chats[s : s + 32], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        out = model.generate(
            **enc,
            do_sample=True,
            top_p=0.95,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts += tokenizer.batch_decode(out, skip_special_tokens=False)
    return [t.replace(tokenizer.pad_token, "") for t in texts]


PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "What are the main causes of the seasons on Earth?",
    "Describe a day in the life of a farmer in the year 1900.",
    "Give step-by-step instructions to bake bread.",
    "Summarise the history of the printing press.",
    "Why is the sky blue? Explain to a child.",
    "Write a letter to a friend about your travels in Italy.",
    "Explain what a prime number is, with examples.",
    "Describe the water cycle in detail.",
    "What makes a good scientific experiment?",
    "Write a poem about the ocean, then explain its imagery.",
    "How do vaccines train the immune system?",
    "Compare cats and dogs as pets.",
    "Explain the rules of chess to a beginner.",
    "Solve step by step: a train travels 120 km in 1.5 hours; what is its speed?",
)
