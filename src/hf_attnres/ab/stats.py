"""The paired difference of two models' held-out loss, with a Student-t confidence interval.

Both arms are evaluated on the same batches, so the noise the batches share (hard text is hard for both)
cancels in the per-batch differences; the interval is over those differences. It says how precisely the
evaluation measured the difference of these two trained models, not how much it would vary over training
seeds (run `ab` with other seeds for that).

The t quantile is computed here (the regularised incomplete beta function by its continued fraction, then
bisection): it is the one number scipy would provide, and scipy is not otherwise a dependency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function I_x(a, b) (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_cf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p for Student's t with `df` degrees of freedom."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"student_t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class PairedDifference:
    """Token-weighted mean loss of arm A minus arm B over the same evaluation batches, with its interval."""

    difference: float
    low: float
    high: float
    level: float
    batches: int
    tokens: int

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "distinguishable": self.distinguishable}


def paired_difference(sums_a: list[float], sums_b: list[float], tokens: list[int],
                      level: float = 0.95) -> PairedDifference:
    """A - B from per-batch loss sums of both arms over the same batches (`tokens` target tokens each).

    The difference is sum(a - b) / sum(tokens), the difference of the two held-out losses. Its interval is the
    t interval of the ratio estimator: per-batch residuals r_b = (a_b - b_b) - difference * tokens_b, whose
    spread over batches gives the standard error (for equal-sized batches: the plain paired t interval).
    """
    if not (len(sums_a) == len(sums_b) == len(tokens)):
        raise ValueError("the two arms were not evaluated on the same batches (different batch counts)")
    n, total = len(tokens), sum(tokens)
    if n < 2 or total <= 0:
        raise ValueError(f"a paired interval needs at least 2 evaluation batches with tokens (got {n})")
    diff = sum(a - b for a, b in zip(sums_a, sums_b)) / total
    residuals = [(a - b) - diff * t for a, b, t in zip(sums_a, sums_b, tokens)]
    var = sum(r * r for r in residuals) / (n - 1)
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * math.sqrt(var * n) / total
    return PairedDifference(diff, diff - half, diff + half, level, n, total)
