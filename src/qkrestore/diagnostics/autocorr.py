"""Token autocorrelation ρ(d) of a corpus and its decay length τ (the paper's Section 4.3, Figure 3).

    ρ(d) = Σ_v π_v · (P(x_{t+d} = v | x_t = v) − π_v) / (1 − π_v)

is how much more likely a token is to come back d positions later than by chance, averaged over token
types with their corpus frequency π_v. Under a hidden Markov model ρ(d) ≤ C·λ₂^d (Appendix G), so the
fitted decay length τ of ρ(d) ≈ A·exp(−d/τ) estimates −1/ln λ₂ of the latent chain: how far back the
data itself asks a model to look. For a symmetric two-state chain ρ(d) = λ₂^d exactly.

Counting is vectorised per distance: one array comparison ``x[:-d] == x[d:]`` finds every pair that
repeats at lag d, and only those (few) positions are binned. Pairs never straddle two documents: each
token knows how many tokens follow it in its document. The per-token denominators
n_v(d) = #{t : x_t = v, t + d in the same document} shrink by one bincount of the tokens that are
exactly d − 1 from their document's end, so the whole pass costs O(T·D) comparisons and O(T) binning.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QKRestoreError
from ..io.runtime import load_tokenizer

TEXT_CHUNK_CHARS = 200_000  # a long .txt is tokenised in pieces cut at line ends
_INTS = re.compile(rb"^[\s0-9]*$")


# -- input ----------------------------------------------------------------------------------------


def looks_like_ids(path: Path, probe_bytes: int = 1 << 20) -> bool:
    """A ``.txt`` holds token ids when its first MiB is only digits and whitespace (and not empty)."""
    with open(path, "rb") as fh:
        head = fh.read(probe_bytes)
    return bool(head.strip()) and bool(_INTS.match(head))


def _tokenize(texts: Iterable[str], tokenizer_dir: Path | None, what: Path) -> list[np.ndarray]:
    if tokenizer_dir is None:
        raise QKRestoreError(
            f"{what}: text input needs --tokenizer (a local folder with the tokenizer files)"
        )
    tok = load_tokenizer(tokenizer_dir, what="--tokenizer")
    out = []
    for text in texts:
        pieces, ids = _chunks(text), []
        for start in range(0, len(pieces), 64):
            batch = pieces[start : start + 64]
            for enc in tok(batch, add_special_tokens=False)["input_ids"]:
                ids.extend(enc)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _chunks(text: str) -> list[str]:
    """Cut a long text at line ends into pieces of about ``TEXT_CHUNK_CHARS`` (lines are kept)."""
    if len(text) <= TEXT_CHUNK_CHARS:
        return [text] if text else []
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + TEXT_CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def load_documents(
    path: Path, tokenizer_dir: Path | None = None, kind: str = "auto"
) -> list[np.ndarray]:
    """Token-id documents from ``.npy``, ``.jsonl`` or ``.txt`` (see docs/diagnostics.md).

    ``kind``: ``auto`` (decide by suffix and, for ``.txt``, by content), ``ids`` or ``text``.
    """
    path = Path(path)
    if not path.is_file():
        raise QKRestoreError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if kind == "text":
            raise QKRestoreError(f"{path}: a .npy file holds token ids, not text")
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise QKRestoreError(f"{path}: not a plain numeric .npy array ({exc})") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise QKRestoreError(f"{path}: token ids must be integers, not {arr.dtype}")
        if arr.ndim == 1:
            return [arr.astype(np.int64)]
        if arr.ndim == 2:
            return [row.astype(np.int64) for row in arr]
        raise QKRestoreError(f"{path}: expected a 1-D or 2-D array of token ids, got {arr.ndim}-D")
    if suffix == ".jsonl":
        texts, docs = [], []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise QKRestoreError(f"{path}:{n}: not a JSON object") from None
                if not isinstance(rec, dict):
                    raise QKRestoreError(f"{path}:{n}: not a JSON object")
                if kind != "text" and isinstance(rec.get("input_ids"), list):
                    docs.append(np.asarray(rec["input_ids"], dtype=np.int64))
                elif isinstance(rec.get("text"), str):
                    texts.append(rec["text"])
                else:
                    raise QKRestoreError(f"{path}:{n}: no 'text' string (or 'input_ids' list)")
        if texts:
            docs += _tokenize(texts, tokenizer_dir, path)
        return docs
    if suffix in (".txt", ".text", ".ids", ""):
        as_ids = kind == "ids" or (kind == "auto" and looks_like_ids(path))
        if as_ids:
            raw = path.read_bytes()
            if not _INTS.match(raw):
                raise QKRestoreError(
                    f"{path}: read as token ids, but it holds more than integers and whitespace",
                    hint="--input-kind text reads it as text (with --tokenizer)",
                )
            return [np.array(raw.split(), dtype=np.int64)]
        return _tokenize([path.read_text(encoding="utf-8")], tokenizer_dir, path)
    raise QKRestoreError(f"{path}: unknown input type '{suffix}' (use .txt, .jsonl or .npy)")


# -- the statistic --------------------------------------------------------------------------------


def autocorrelation(docs: Sequence[np.ndarray], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, rho)`` for d = 1..max_distance over all documents (no pair crosses two)."""
    docs = [np.asarray(d).ravel() for d in docs if np.asarray(d).size]
    if not docs:
        raise QKRestoreError("the input holds no tokens")
    raw = np.concatenate(docs)
    _, x = np.unique(raw, return_inverse=True)  # compact ids 0..V-1
    x = x.astype(np.int64)
    vocab = int(x.max()) + 1
    total = x.size
    # tokens after t in t's document: position t pairs with t + d iff after[t] >= d
    after = np.concatenate([np.arange(len(d) - 1, -1, -1, dtype=np.int64) for d in docs])
    counts = np.bincount(x, minlength=vocab).astype(np.float64)
    pi = counts / total
    weight = np.where(pi < 1, pi / np.where(pi < 1, 1 - pi, 1), 0.0)  # π_v / (1 − π_v)

    # tokens grouped by their distance to the end, to shrink n_v(d) one lag at a time
    near = np.flatnonzero(after < max_distance)
    order = near[np.argsort(after[near], kind="stable")]
    bounds = np.searchsorted(after[order], np.arange(max_distance + 1))
    n_v = counts.copy()

    distances = np.arange(1, max_distance + 1)
    rho = np.full(max_distance, np.nan)
    for d in distances:
        gone = order[bounds[d - 1] : bounds[d]]  # tokens with exactly d − 1 tokens after them
        if gone.size:
            n_v -= np.bincount(x[gone], minlength=vocab)
        if d >= total:
            break
        hits = np.flatnonzero(x[:-d] == x[d:])
        hits = hits[after[hits] >= d]
        m_v = np.bincount(x[hits], minlength=vocab)
        ok = n_v > 0
        if not ok.any():
            break
        cond = np.zeros(vocab)
        cond[ok] = m_v[ok] / n_v[ok]
        rho[d - 1] = float(np.sum((weight * (cond - pi))[ok]))
    return distances, rho


@dataclass(frozen=True)
class ExpFit:
    """ρ(d) ≈ A·exp(−d/τ), fitted on ``distances[:used]``."""

    amplitude: float  # A
    tau: float
    used: int  # number of leading distances in the fit
    r2: float


def fit_exponential(distances: np.ndarray, rho: np.ndarray) -> ExpFit:
    """Log-linear least squares ``ln ρ = ln A − d/τ`` on the leading run of positive ρ, weighted by ρ².

    Why the weights: ρ̂(d) carries roughly constant additive sampling noise, so ``ln ρ̂`` has variance
    ≈ σ²/ρ² and the tail, where ρ has decayed into the noise, would dominate an unweighted fit (on a
    two-state chain of 10⁵ tokens it misses τ by 30–100 %; weighted, by a few %). Weighting by ρ²
    is the textbook correction for a log-transformed fit. Only the *leading* positive run is used:
    positive values that noise leaves further out say nothing about the decay. A flat or rising ρ
    gives τ = ∞. ``r2`` is the weighted coefficient of determination.
    """
    d = np.asarray(distances, dtype=np.float64)
    r = np.asarray(rho, dtype=np.float64)
    bad = ~(np.isfinite(r) & (r > 0))
    used = int(np.argmax(bad)) if bad.any() else r.size
    if used < 2:
        raise QKRestoreError(
            "ρ(d) is not positive at the first two distances: the corpus shows no autocorrelation "
            "to fit (too few tokens, or shuffled text?)"
        )
    x, y, w = d[:used], np.log(r[:used]), r[:used] ** 2
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))  # polyfit squares its weights
    pred = intercept + slope * x
    mean = float(np.sum(w * y) / np.sum(w))
    ss_res = float(np.sum(w * (y - pred) ** 2))
    ss_tot = float(np.sum(w * (y - mean) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    tau = -1.0 / slope if slope < 0 else math.inf
    return ExpFit(amplitude=float(math.exp(intercept)), tau=float(tau), used=used, r2=r2)


def autocorr_report(docs: Sequence[np.ndarray], max_distance: int) -> dict[str, Any]:
    """The ``autocorr`` JSON document."""
    if max_distance < 2:
        raise QKRestoreError(f"--max-distance {max_distance}: need at least 2 to fit")
    distances, rho = autocorrelation(docs, max_distance)
    notes = []
    fit: ExpFit | None
    try:
        fit = fit_exponential(distances, rho)
    except QKRestoreError as exc:
        fit = None
        notes.append(f"no fit: {exc.message}")
    else:
        if not math.isfinite(fit.tau):
            notes.append("ρ(d) does not decay over the fitted range: τ is infinite (null)")
    tokens = int(sum(np.asarray(x).size for x in docs))
    return {
        "tau": fit.tau if fit and math.isfinite(fit.tau) else None,
        "A": fit.amplitude if fit else None,
        "r2": fit.r2 if fit else None,
        "fit_distances": [1, int(distances[fit.used - 1])] if fit else None,
        "notes": notes,
        "rho": [None if not np.isfinite(v) else float(v) for v in rho],
        "distances": [int(v) for v in distances],
        "tokens": tokens,
        "documents": len(docs),
        "vocab_seen": int(np.unique(np.concatenate([np.asarray(x).ravel() for x in docs])).size),
    }
