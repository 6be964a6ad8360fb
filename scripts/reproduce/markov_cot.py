"""Markov-local CoT traces over the whole vocabulary, from a latent chain with a known spectral gap
(the analog setup's SFT data; ``run.py --cot-task markov``).

The first setup's traces (running sums written with 17 digit and operator tokens) had two faults
for this experiment: SFT touched a handful of tokens, so it could break recall by moving those
tokens' embeddings alone, and their token autocorrelation was flat, so the paper's decay length τ
was undefined. Here every content token (the needle keys, values and filler: all ids from
``data.N_SPECIAL`` up) is both an input and an output of the reasoning task.

A content token ``v`` has a *class* ``(v - N_SPECIAL) % 10`` (a digit) and a *variant*
``(v - N_SPECIAL) // 10``. A problem lists n content tokens ``x_1 .. x_n``; the trace has one token
per step, ``y_i`` = the token with ``x_i``'s variant and class ``s_i``, the running sum of the classes
mod 10 so far; it ends with ``ANS s_n EOS`` (``s_n`` as a digit token)::

    BOS PROB x_1 .. x_n EQ NL | y_1 .. y_n ANS s_n EOS

So each step quotes one context token (its variant) and does one local update of the latent state
``s``. The classes of ``x_2 .. x_n`` are 0 with probability ``p0`` and otherwise uniform over 1..9, and
``x_1``'s class is uniform: the latent sums form a stationary lazy chain on 10 states whose
transition matrix ``p0·I + (1 - p0)/9·(J - I)`` has second eigenvalue ``λ₂ = (10·p0 - 1)/9``. The
variants are uniform and independent, so the trace tokens are a hidden Markov chain whose token
autocorrelation (``qkrestore autocorr``'s ρ) is exactly ``C·λ₂^d``: the decay length is
``τ = -1/ln λ₂``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from data import ANS, BOS, DIGIT0, EOS, EQ, N_SPECIAL, NL, PAD, PROB, Vocab

N_CLASSES = 10


@dataclass(frozen=True)
class MarkovCoT:
    """The task for one vocabulary and one second eigenvalue ``lam`` of the latent chain."""

    vocab: Vocab
    lam: float = 0.75

    def __post_init__(self) -> None:
        if not -1 / 9 < self.lam < 1:
            raise ValueError(f"lam {self.lam}: a lazy 10-state chain has -1/9 < λ₂ < 1")
        if self.n_variants < 1:
            raise ValueError("the vocabulary has fewer than 10 content tokens")

    @property
    def n_variants(self) -> int:
        return (self.vocab.fill0 + self.vocab.n_fill - N_SPECIAL) // N_CLASSES

    @property
    def p0(self) -> float:
        """Probability that a step leaves the latent sum where it is."""
        return (9 * self.lam + 1) / 10

    @property
    def tau(self) -> float:
        """The decay length the trace tokens' autocorrelation has by construction."""
        return -1.0 / math.log(self.lam)

    def token(self, variant: np.ndarray | int, cls: np.ndarray | int) -> np.ndarray:
        return N_SPECIAL + N_CLASSES * np.asarray(variant) + np.asarray(cls)

    def classes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The latent increments: the first uniform (so the chain starts stationary), the rest lazy."""
        d = np.where(rng.random(n) < self.p0, 0, rng.integers(1, N_CLASSES, n))
        d[0] = rng.integers(0, N_CLASSES)
        return d

    def example(self, rng: np.random.Generator, n: int) -> tuple[list[int], list[int]]:
        """``(prompt, response)`` token lists of one problem of ``n`` steps."""
        d = self.classes(rng, n)
        r = rng.integers(0, self.n_variants, n)
        s = np.cumsum(d) % N_CLASSES
        prompt = [BOS, PROB, *self.token(r, d).tolist(), EQ, NL]
        resp = [*self.token(r, s).tolist(), ANS, DIGIT0 + int(s[-1]), EOS]
        return prompt, resp

    def worked(self, rng: np.random.Generator, n_max: int) -> np.ndarray:
        """A short worked problem as it appears in pre-training text (no BOS)."""
        prompt, resp = self.example(rng, int(rng.integers(3, n_max + 1)))
        return np.array(prompt[1:] + resp)

    def direct(self, rng: np.random.Generator, n_max: int) -> np.ndarray:
        """A problem answered without the trace (pre-training text)."""
        prompt, resp = self.example(rng, int(rng.integers(3, n_max + 1)))
        return np.array([*prompt[1:-1], *resp[-3:]])

    def batch(
        self, rng: np.random.Generator, batch: int, n_min: int, n_max: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ``(ids, labels)``; labels are -100 on the prompt and the padding."""
        exs = [self.example(rng, int(rng.integers(n_min, n_max + 1))) for _ in range(batch)]
        width = max(len(p) + len(r) for p, r in exs)
        ids = np.full((batch, width), PAD, dtype=np.int64)
        labels = np.full((batch, width), -100, dtype=np.int64)
        for b, (p, r) in enumerate(exs):
            ids[b, : len(p) + len(r)] = p + r
            labels[b, len(p) : len(p) + len(r)] = r
        return ids, labels

    def traces(
        self, rng: np.random.Generator, count: int, n_min: int, n_max: int
    ) -> list[list[int]]:
        """The step tokens ``y_1 .. y_n`` of ``count`` traces (the corpus ``autocorr`` reads)."""
        return [
            self.example(rng, int(rng.integers(n_min, n_max + 1)))[1][:-3] for _ in range(count)
        ]
