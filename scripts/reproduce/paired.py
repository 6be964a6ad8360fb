"""Paired contrasts with 95 % intervals: the statistics the reproduction reports use.

Why paired: every candidate of a run (QK-Restore, QK-Pro, the ablations, ...) is built from the same
+SFT checkpoint and scored on the same prompts, so the question "does restoring help?" is a
*difference* against +SFT of the same run. Levels averaged over runs (mean ± sd) mix that effect with
the run-to-run spread of +SFT itself, which in the analog setup was larger than the effect.

Two intervals, for two kinds of replication:

* **across runs** (:func:`t_interval`): per run one difference d_r = candidate − +SFT; the mean of
  the d_r with a Student-t interval (n − 1 degrees of freedom). This is the interval that speaks
  for the *training procedure* (a fresh seed would land somewhere in this spread).
* **within a run, over items** (:func:`paired_items`): the same prompts are scored for both models,
  so the discordant pairs carry the information (McNemar's setting). The interval is Agresti and
  Min's (2005) adjusted Wald interval for a difference of paired proportions (add 1/2 to each of
  the four cells), and the p-value is McNemar's exact (binomial) test. It speaks only for *this*
  checkpoint on *this* prompt distribution.

Pure functions only; no numpy or scipy needed (the t quantiles are tabulated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Student t 0.975 quantiles by degrees of freedom (exact to 3 decimals); beyond the table the
# quantile is interpolated linearly in 1/df towards the normal 1.960.
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df ≥ 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: need at least 1")
    if df in T975:
        return T975[df]
    keys = sorted(T975)
    if df > keys[-1]:
        lo, hi, qlo, qhi = keys[-1], math.inf, T975[keys[-1]], Z975
    else:
        lo = max(k for k in keys if k < df)
        hi = min(k for k in keys if k > df)
        qlo, qhi = T975[lo], T975[hi]
    x, xlo, xhi = 1 / df, 1 / lo, (0.0 if hi == math.inf else 1 / hi)
    return qhi + (qlo - qhi) * (x - xhi) / (xlo - xhi)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95 % interval (``lo``/``hi`` None when it cannot be formed)."""

    estimate: float
    lo: float | None
    hi: float | None
    n: int
    p: float | None = None  # a two-sided p-value where the method gives one
    wins: int | None = None  # runs (or items) where the candidate was better
    losses: int | None = None  # ... and worse

    def excludes_zero(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``+3.2 [−1.0, +7.4]`` in points (scale 100) or as given."""
        f = f"{{:+.{digits}f}}"
        est = f.format(self.estimate * scale)
        if self.lo is None or self.hi is None:
            return f"{est} [n={self.n}]"
        return f"{est} [{f.format(self.lo * scale)}, {f.format(self.hi * scale)}]"


def t_interval(diffs: Sequence[float]) -> Interval:
    """Mean of per-run differences with a two-sided 95 % Student-t interval over runs.

    ``mean ± t_{0.975, n−1} · s / √n`` with ``s`` the sample standard deviation; one run gives the
    difference with no interval.
    """
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise ValueError("no differences")
    m = sum(d) / n
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    if n == 1:
        return Interval(m, None, None, 1, wins=wins, losses=losses)
    s = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    h = t975(n - 1) * s / math.sqrt(n)
    return Interval(m, m - h, m + h, n, wins=wins, losses=losses)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``min(1, 2 · P[X ≤ min(b, c)])``, X ~ Binomial(b + c, ½)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_items(cand: Sequence[bool | int], base: Sequence[bool | int]) -> Interval:
    """Difference of two paired proportions (``cand`` − ``base``, the same items in the same order)
    with the Agresti–Min 95 % interval and McNemar's exact p-value.

    With ``b`` items right only for ``cand``, ``c`` right only for ``base`` and ``n`` items:
    estimate ``(b − c)/n``; interval ``d̃ ± z·√((b̃ + c̃ − (b̃ − c̃)²/ñ)/ñ)/ñ`` where
    ``b̃ = b + ½``, ``c̃ = c + ½``, ``ñ = n + 2`` and ``d̃ = (b̃ − c̃)/ñ``; clipped to [−1, 1].
    """
    if len(cand) != len(base):
        raise ValueError(f"paired items: {len(cand)} against {len(base)}")
    n = len(cand)
    if n == 0:
        raise ValueError("no items")
    b = sum(1 for x, y in zip(cand, base) if x and not y)
    c = sum(1 for x, y in zip(cand, base) if y and not x)
    bt, ct, nt = b + 0.5, c + 0.5, n + 2.0
    dt = (bt - ct) / nt
    var = (bt + ct - (bt - ct) ** 2 / nt) / nt**2
    h = Z975 * math.sqrt(max(var, 0.0))
    return Interval(
        (b - c) / n, max(-1.0, dt - h), min(1.0, dt + h), n, mcnemar_exact_p(b, c), b, c
    )


def accuracy(bits: Sequence[bool | int]) -> float:
    return sum(1 for x in bits if x) / len(bits) if bits else float("nan")
