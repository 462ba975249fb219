"""Uncertainty for accuracies and paired comparisons: small pure functions shared by diagnose, compare and
suites. Every interval is two-sided at `confidence` (default 95%).

- `wilson_interval`: an accuracy (k correct of n), Wilson score interval.
- `mean_interval`: a mean over seeds or runs, Student t-interval.
- `mcnemar_exact`: two conditions answered on the same samples, exact two-sided McNemar test on the
  discordant counts; `paired_comparison` packs it with the accuracy difference.
- `paired_bootstrap`: percentile bootstrap interval of the accuracy difference, resampling samples (seeded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval."""

    estimate: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class PairedComparison:
    """Condition against baseline on the same samples: `delta` = accuracy(condition) - accuracy(baseline);
    `baseline_only` / `condition_only` count samples right under one and wrong under the other."""

    delta: float
    baseline_only: int
    condition_only: int
    p_value: float  # exact two-sided McNemar


def _normal_quantile(confidence: float) -> float:
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion successes / n: the p whose score test |p_hat - p| /
    sqrt(p (1 - p) / n) <= z accepts; stays inside [0, 1] and is sensible at 0 and n successes."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _normal_quantile(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student t-interval of a mean: mean +- t_{(1+c)/2, n-1} * s / sqrt(n) (s the sample std, n - 1 dof).
    One value gives a zero-width interval at it."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def t_quantile(probability: float, dof: int) -> float:
    """The `probability` quantile of Student's t with `dof` degrees of freedom (bisection on `t_cdf`)."""
    _check_confidence(probability)
    if dof < 1:
        raise ValueError(f"dof must be at least 1, got {dof}")
    low, high = -1.0, 1.0
    while t_cdf(low, dof) > probability:
        low *= 2
    while t_cdf(high, dof) < probability:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, dof) < probability else (low, middle)
    return (low + high) / 2


def t_cdf(x: float, dof: int) -> float:
    """P(T <= x) for Student's t: 1 - I_{dof/(dof+x^2)}(dof/2, 1/2) / 2 for x >= 0 (I the regularised
    incomplete beta), symmetric for x < 0."""
    tail = 0.5 * _incomplete_beta(dof / 2, 0.5, dof / (dof + x * x))
    return 1.0 - tail if x >= 0 else tail


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only: use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def mcnemar_exact(baseline_only: int, condition_only: int) -> float:
    """Exact two-sided McNemar p-value: under no difference each of the n = b + c discordant samples goes
    either way with probability 1/2, so p = min(1, 2 * P(Binomial(n, 1/2) <= min(b, c))); 1 when n = 0."""
    if baseline_only < 0 or condition_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {baseline_only} and {condition_only}")
    n = baseline_only + condition_only
    tail = sum(math.comb(n, i) for i in range(min(baseline_only, condition_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(baseline: Sequence[bool], condition: Sequence[bool]) -> PairedComparison:
    """Accuracy difference and exact McNemar test of two conditions scored on the same samples, in order."""
    _check_paired(baseline, condition)
    baseline_only = sum(a and not b for a, b in zip(baseline, condition))
    condition_only = sum(b and not a for a, b in zip(baseline, condition))
    delta = (condition_only - baseline_only) / len(baseline)
    return PairedComparison(
        delta, baseline_only, condition_only, mcnemar_exact(baseline_only, condition_only)
    )


def paired_bootstrap(
    baseline: Sequence[bool],
    condition: Sequence[bool],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile bootstrap of accuracy(condition) - accuracy(baseline): samples are drawn with replacement,
    each keeping its pair of outcomes; deterministic for a given seed."""
    _check_paired(baseline, condition)
    _check_confidence(confidence)
    n = len(baseline)
    differences = [int(b) - int(a) for a, b in zip(baseline, condition)]
    generator = random.Random(seed)
    deltas = sorted(sum(generator.choices(differences, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = deltas[math.floor(tail * (resamples - 1))]
    high = deltas[math.ceil((1 - tail) * (resamples - 1))]
    return Interval(sum(differences) / n, low, high)


def _check_paired(baseline: Sequence[bool], condition: Sequence[bool]) -> None:
    if len(baseline) != len(condition) or not baseline:
        raise ValueError(
            f"paired outcomes need the same non-zero number of samples, got {len(baseline)} and {len(condition)}"
        )


FIRST_STEP_WORDS = 12  # the opening that counts as an answer's first step (diversity among k answers)


def first_step(text: str, words: int = FIRST_STEP_WORDS) -> str:
    """An answer's opening, as the diversity of k answers compares them: its first `words` words."""
    return " ".join(text.split()[:words])
