"""Whether a probe can decide: binomial (Wilson) intervals, chance level, ties within noise.

Why: a recall probe that the model never passes (an untrained or mismatched probe, lengths past the
model's reach) scores every candidate 0, and a probe of 10 samples cannot tell 0.6 from 0.8. Ranking,
starring a Pareto front and writing a recipe from such numbers would present noise as advice, so
``sweep`` and ``select-layers`` ask this module first and say when the numbers cannot decide.

Every score here is a proportion of exact matches over ``n`` independent trials (NIAH samples per
length, items of a file). Its uncertainty is the Wilson score interval at 95 %, which, unlike the
normal approximation, stays inside [0, 1] and is not empty at 0 or 1. Chance for an exact-match
probe is ~0 (a random answer reproduces a 7-digit number or an item's exact tokens with probability
far below 1/n), so a score is *at chance* when its interval reaches down to 0, i.e. no trial passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
CHANCE = 0.0  # exact match of a random answer


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``successes`` of ``n`` trials (``successes`` may be a
    proportion times ``n``, e.g. a mean over equal-sized groups)."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(1.0, max(0.0, successes / n))
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if p == 0.0 else max(0.0, centre - half)  # exact at the ends, not 1 - 1e-16
    hi = 1.0 if p == 1.0 else min(1.0, centre + half)
    return (lo, hi)


def interval(score: float | None, n: int) -> list[float] | None:
    """A score's 95 % Wilson interval as a JSON pair (rounded to 4 places), or None."""
    if score is None or not math.isfinite(score) or n <= 0:
        return None
    lo, hi = wilson(score * n, n)
    return [round(lo, 4), round(hi, 4)]


def at_chance(score: float | None, n: int) -> bool:
    """Whether an exact-match score cannot be told from chance: no trial of ``n`` passed."""
    return score is not None and n > 0 and round(score * n) <= CHANCE * n


def tied(intervals: Sequence[Sequence[float] | None]) -> bool:
    """Whether every pair of intervals overlaps (no candidate is told apart from any other).

    Two or more candidates are needed to be tied; missing intervals are left out."""
    known = [iv for iv in intervals if iv is not None]
    if len(known) < 2:
        return False
    return max(lo for lo, _ in known) <= min(hi for _, hi in known)


@dataclass(frozen=True)
class Verdict:
    """Whether a probe's scores can rank candidates, and if not, why (one sentence each)."""

    decides: bool
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"decides": self.decides, "reasons": list(self.reasons)}

    def text(self) -> str:
        return "; ".join(self.reasons)


def verdict(
    rows: Sequence[dict[str, Any]],
    score_key: str,
    ci_key: str,
    trials_key: str,
    chance_rows: Sequence[tuple[str, dict[str, Any]]],
    what: str,
) -> Verdict:
    """Whether ``rows``' scores (``row[score_key]``, interval ``row[ci_key]``, ``row[trials_key]``
    trials) can decide: not when a reference row (``chance_rows``: label, row) is at chance, nor
    when every row's interval overlaps every other's."""
    reasons = []
    for label, row in chance_rows:
        n = int(row.get(trials_key) or 0)
        if at_chance(row.get(score_key), n):
            reasons.append(f"{label}'s {what} is at chance (0 of {n} correct)")
    ivs = [r.get(ci_key) for r in rows if r.get(score_key) is not None]
    if tied(ivs):
        reasons.append(
            f"every candidate's {what} lies within the others' 95 % intervals "
            "(tied within the probe's noise)"
        )
    return Verdict(not reasons, tuple(reasons))
