"""Synthetic data for the QK-Restore reproduction: an integer vocabulary, no tokenizer.

Two sources:

* **Haystack documents** (pre-training and the recall probe): filler text from a fixed first-order
  Markov source, with *needles* ``NEEDLE key v1 v2`` planted in it and *queries*
  ``QUERY key v1 v2`` that ask for them. Answering a query needs the needle, which can be the whole
  context away: long-range recall. In pre-training the queries are spread through the text, each
  after its needle, so every document holds many recall examples at every distance; the probe puts
  them at the end and asks only for needles from the first half.
* **CoT traces** (SFT and the reasoning metric): a running sum mod 10 of n digits, written out one
  step per line (``s PLUS d EQ s' NL``). Each line depends on the previous one and on one digit of
  the prompt: short-range, local Markov structure, as in Section 4 of the paper.

Pre-training also sees a few *direct-answer* problems (``PROB d1 .. dn EQ ANS s EOS``) inside filler
text and, unless turned off, a few *short* step-by-step traces (3 to ``cot_max`` digits): like the
paper's base models, PRE has seen worked reasoning, and SFT makes it longer and reliable. With
``cot_max=0`` PRE never sees the step-by-step format (the first GPU run's setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS, NEEDLE, QUERY, SEP, PROB, EQ, PLUS, NL, ANS = range(11)  # SEP: kept, unused
DIGIT0 = 16  # 16..25 are the digits 0..9
N_SPECIAL = 26
SEG = 4  # tokens in one needle or query segment: NEEDLE/QUERY, key, v1, v2


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
    """``body`` with each segment inserted before body index ``positions[i]``; segments at the
    same index keep their list order."""
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
    spread: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [B, length], answer_pos [B, n_queries, 2])``: answer_pos are the v1/v2 positions.

    Queries go at the end of the document, in random order, unless ``spread``: then each is
    inserted at a random point after its needle (pre-training). ``far``: the queried needles are
    those in the first half of the document (the probe); otherwise any."""
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
        segs = [np.array([NEEDLE, k, a, c]) for k, (a, c) in zip(keys, vals, strict=True)]
        if far:  # queried needles from the first half of the context (else the earliest ones)
            start_in_doc = 1 + pos + SEG * np.arange(n_needles)  # after BOS and earlier needles
            cand = np.flatnonzero(start_in_doc < length // 2)
            if len(cand) < n_queries:
                cand = np.arange(n_queries)
            qi = rng.choice(cand, n_queries, replace=False)
        else:
            qi = rng.choice(n_needles, n_queries, replace=False)
        queries = [np.array([QUERY, keys[i], vals[i, 0], vals[i, 1]]) for i in qi]
        if spread:  # each query somewhere after its needle (a tie keeps the needle first)
            q_pos = [int(rng.integers(pos[i], body_len + 1)) for i in qi]
            doc = _insert(bodies[b], segs + queries, [*pos, *q_pos])
        else:
            doc = np.concatenate([_insert(bodies[b], segs, list(pos)), *queries])
        ids[b] = np.concatenate([[BOS], doc])
        q_at = np.flatnonzero(ids[b] == QUERY)
        ans[b] = np.stack([q_at + SEG - 2, q_at + SEG - 1], axis=1)
    return ids, ans


def direct_problem(rng: np.random.Generator, n_max: int) -> np.ndarray:
    n = int(rng.integers(3, n_max + 1))
    d = rng.integers(0, 10, n)
    return np.array([PROB, *(d + DIGIT0), EQ, ANS, d.sum() % 10 + DIGIT0, EOS])


def worked_problem(rng: np.random.Generator, n_max: int) -> np.ndarray:
    """A short step-by-step trace as it appears in pre-training text (no BOS)."""
    prompt, resp = cot_example(rng.integers(0, 10, int(rng.integers(3, n_max + 1))))
    return np.array(prompt[1:] + resp)


def plain_batch(
    rng: np.random.Generator,
    markov: Markov,
    batch: int,
    length: int,
    n_problems: int,
    n_max: int,
    cot_max: int = 0,
    task=None,
) -> np.ndarray:
    """General next-token text: filler with a few arithmetic problems in it, half of them worked
    step by step (3..``cot_max`` digits) when ``cot_max`` >= 3, else all direct-answer. ``task``:
    an object with ``worked(rng, n_max)`` and ``direct(rng, n_max)`` for the problems
    (``markov_cot.MarkovCoT``); None: running sums of digits."""
    worked = worked_problem if task is None else task.worked
    direct = direct_problem if task is None else task.direct
    out = np.empty((batch, length), dtype=np.int64)
    bodies = markov.sample(rng, batch, length)
    for b in range(batch):
        probs = [
            worked(rng, cot_max) if cot_max >= 3 and rng.random() < 0.5 else direct(rng, n_max)
            for _ in range(n_problems)
        ]
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


def pack_batch(ids: np.ndarray, labels: np.ndarray, pack_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The same SFT examples packed: each row's tokens (up to its padding) concatenated in order and
    cut into rows of ``pack_len`` tokens, the last one right-padded (``--sft-packing``).

    Why: every CoT-SFT sequence of the analog is at most 27 tokens, so a fine-tune on them never
    shows the softmax layers a long context; the paper fine-tunes on long sequences whose useful
    dependencies are local. Packing keeps the examples, their order and their loss mask (-100 on
    prompts and padding) and changes only what each position can attend to: positions run on across
    examples and nothing is masked between them.
    """
    if pack_len < 1:
        raise ValueError(f"pack_len {pack_len}: must be at least 1")
    real = ids != PAD
    flat_ids = ids[real]
    flat_labels = labels[real]
    rows = max(1, -(-len(flat_ids) // pack_len))
    out_ids = np.full((rows, pack_len), PAD, dtype=ids.dtype)
    out_labels = np.full((rows, pack_len), -100, dtype=labels.dtype)
    out_ids.reshape(-1)[: len(flat_ids)] = flat_ids
    out_labels.reshape(-1)[: len(flat_labels)] = flat_labels
    return out_ids, out_labels
