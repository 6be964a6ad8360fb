"""Synthetic data for the QK-Restore reproduction: an integer vocabulary, no tokenizer.

Two sources:

* **Haystack documents** (pre-training and the recall probe): filler text from a fixed first-order
  Markov source, with *needles* ``NEEDLE key SEP v1 v2`` planted in it and *queries*
  ``QUERY key SEP v1 v2`` at the end. Answering a query needs the needle, which can be the whole
  context away: long-range recall.
* **CoT traces** (SFT and the reasoning metric): a running sum mod 10 of n digits, written out one
  step per line (``s PLUS d EQ s' NL``). Each line depends on the previous one and on one digit of
  the prompt: short-range, local Markov structure, as in Section 4 of the paper.

Pre-training also sees a few *direct-answer* problems (``PROB d1 .. dn EQ ANS s EOS``) inside filler
text, so PRE knows the tokens but was never shown the step-by-step format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS, NEEDLE, QUERY, SEP, PROB, EQ, PLUS, NL, ANS = range(11)
DIGIT0 = 16  # 16..25 are the digits 0..9
N_SPECIAL = 26
SEG = 5  # tokens in one needle or query segment


@dataclass(frozen=True)
class Vocab:
    n_keys: int = 64
    n_vals: int = 32
    n_fill: int = 64

    @property
    def key0(self) -> int:
        return N_SPECIAL

    @property
    def val0(self) -> int:
        return self.key0 + self.n_keys

    @property
    def fill0(self) -> int:
        return self.val0 + self.n_vals

    @property
    def size(self) -> int:
        n = self.fill0 + self.n_fill
        return (n + 15) // 16 * 16  # multiple of 16 (CUDA kernels like aligned strides)


class Markov:
    """Fixed sparse first-order Markov source over the filler tokens (4 successors each)."""

    PROBS = np.array([0.55, 0.25, 0.15, 0.05])

    def __init__(self, vocab: Vocab, seed: int = 1234) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.succ = np.stack(
            [rng.choice(vocab.n_fill, 4, replace=False) for _ in range(vocab.n_fill)]
        )

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        out = np.empty((batch, length), dtype=np.int64)
        cur = rng.integers(0, self.vocab.n_fill, batch)
        idx = np.searchsorted(np.cumsum(self.PROBS), rng.random((batch, length)))
        idx = np.minimum(idx, 3)
        for t in range(length):
            out[:, t] = cur
            cur = self.succ[cur, idx[:, t]]
        return out + self.vocab.fill0


def _insert(body: np.ndarray, segments: list[np.ndarray], positions: list[int]) -> np.ndarray:
    parts, last = [], 0
    for pos, seg in sorted(zip(positions, segments, strict=True), key=lambda x: x[0]):
        parts.append(body[last:pos])
        parts.append(seg)
        last = pos
    parts.append(body[last:])
    return np.concatenate(parts)


def haystack_batch(
    rng: np.random.Generator,
    markov: Markov,
    batch: int,
    length: int,
    n_needles: int,
    n_queries: int,
    far: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [B, length], answer_pos [B, n_queries, 2])``: answer_pos are the v1/v2 positions."""
    v = markov.vocab
    body_len = length - 1 - SEG * (n_needles + n_queries)
    if body_len < 8:
        raise ValueError(f"length {length} too short for {n_needles} needles")
    bodies = markov.sample(rng, batch, body_len)
    ids = np.empty((batch, length), dtype=np.int64)
    ans = np.empty((batch, n_queries, 2), dtype=np.int64)
    for b in range(batch):
        keys = rng.choice(v.n_keys, n_needles, replace=False) + v.key0
        vals = rng.integers(0, v.n_vals, (n_needles, 2)) + v.val0
        pos = np.sort(rng.choice(body_len + 1, n_needles, replace=True))
        segs = [np.array([NEEDLE, k, SEP, a, c]) for k, (a, c) in zip(keys, vals, strict=True)]
        doc = _insert(bodies[b], segs, list(pos))
        if far:  # queried needles from the first half of the context
            cand = np.flatnonzero(pos < body_len // 2)
            if len(cand) < n_queries:
                cand = np.arange(n_queries)
            qi = rng.choice(cand, n_queries, replace=False)
        else:
            qi = rng.choice(n_needles, n_queries, replace=False)
        tail = [np.array([QUERY, keys[i], SEP, vals[i, 0], vals[i, 1]]) for i in qi]
        ids[b] = np.concatenate([[BOS], doc, *tail])
        start = length - SEG * n_queries
        for j in range(n_queries):
            ans[b, j] = (start + SEG * j + 3, start + SEG * j + 4)
    return ids, ans


def direct_problem(rng: np.random.Generator, n_max: int) -> np.ndarray:
    n = int(rng.integers(3, n_max + 1))
    d = rng.integers(0, 10, n)
    return np.array([PROB, *(d + DIGIT0), EQ, ANS, d.sum() % 10 + DIGIT0, EOS])


def plain_batch(
    rng: np.random.Generator, markov: Markov, batch: int, length: int, n_problems: int, n_max: int
) -> np.ndarray:
    """General next-token text: filler with a few direct-answer arithmetic problems in it."""
    out = np.empty((batch, length), dtype=np.int64)
    bodies = markov.sample(rng, batch, length)
    for b in range(batch):
        probs = [direct_problem(rng, n_max) for _ in range(n_problems)]
        body_len = length - 1 - sum(len(p) for p in probs)
        pos = list(rng.choice(body_len + 1, n_problems))
        out[b] = np.concatenate([[BOS], _insert(bodies[b, :body_len], probs, pos)])
    return out


def cot_example(digits: np.ndarray) -> tuple[list[int], list[int]]:
    """(prompt, response) token lists of one step-by-step running-sum trace."""
    prompt = [BOS, PROB, *(int(x) + DIGIT0 for x in digits), EQ, NL]
    resp: list[int] = []
    s = int(digits[0])
    for d in digits[1:]:
        s2 = (s + int(d)) % 10
        resp += [s + DIGIT0, PLUS, int(d) + DIGIT0, EQ, s2 + DIGIT0, NL]
        s = s2
    resp += [ANS, s + DIGIT0, EOS]
    return prompt, resp


def cot_batch(
    rng: np.random.Generator, batch: int, n_min: int, n_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(ids, labels)``; labels are -100 on the prompt and the padding."""
    exs = [
        cot_example(rng.integers(0, 10, int(rng.integers(n_min, n_max + 1)))) for _ in range(batch)
    ]
    width = max(len(p) + len(r) for p, r in exs)
    ids = np.full((batch, width), PAD, dtype=np.int64)
    labels = np.full((batch, width), -100, dtype=np.int64)
    for b, (p, r) in enumerate(exs):
        seq = p + r
        ids[b, : len(seq)] = seq
        labels[b, len(p) : len(seq)] = r
    return ids, labels
