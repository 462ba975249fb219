"""`latentkit.eval.stats` against independent computations: the Wilson bounds as roots of the score test
found by bisection, t quantiles against printed tables and the t CDF against numerical integration of the
density, McNemar against the binomial enumerated with math.comb in exact fractions."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from latentkit.eval.stats import (
    mcnemar_exact,
    mean_interval,
    paired_bootstrap,
    paired_comparison,
    t_cdf,
    t_quantile,
    wilson_interval,
)

Z95 = 1.959963984540054


def score_test_root(k: int, n: int, upper: bool) -> float:
    """The p on one side of k/n where (k/n - p)^2 = z^2 p (1 - p) / n, by bisection."""
    p_hat = k / n

    def excess(p: float) -> float:
        return (p_hat - p) ** 2 - Z95**2 * p * (1 - p) / n

    low, high = (p_hat, 1.0) if upper else (0.0, p_hat)
    if (excess(high) if upper else excess(low)) < 0:
        return high if upper else low
    for _ in range(200):
        middle = (low + high) / 2
        inside = excess(middle) < 0
        if upper:
            low, high = (middle, high) if inside else (low, middle)
        else:
            low, high = (low, middle) if inside else (middle, high)
    return (low + high) / 2


@pytest.mark.parametrize(("k", "n"), [(0, 10), (8, 10), (10, 10), (1, 3), (37, 64), (500, 1000)])
def test_wilson_bounds_solve_the_score_test(k, n):
    interval = wilson_interval(k, n)
    assert interval.estimate == k / n
    assert interval.low == pytest.approx(score_test_root(k, n, upper=False), abs=1e-9)
    assert interval.high == pytest.approx(score_test_root(k, n, upper=True), abs=1e-9)


def test_wilson_known_values_and_errors():
    interval = wilson_interval(8, 10)
    assert (interval.low, interval.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 10).high == pytest.approx(0.2775, abs=1e-4)
    wider = wilson_interval(8, 10, confidence=0.99)
    assert wider.low < interval.low and wider.high > interval.high
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def t_density(x: float, dof: int) -> float:
    front = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    return front * (1 + x * x / dof) ** (-(dof + 1) / 2)


def simpson_cdf(x: float, dof: int, steps: int = 20_000) -> float:
    """0.5 + the integral of the density from 0 to x (Simpson's rule)."""
    h = x / steps
    total = t_density(0, dof) + t_density(x, dof)
    total += sum((4 if i % 2 else 2) * t_density(i * h, dof) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("dof", [1, 2, 5, 30])
@pytest.mark.parametrize("x", [0.3, 1.0, 2.5])
def test_t_cdf_matches_the_integrated_density(dof, x):
    assert t_cdf(x, dof) == pytest.approx(simpson_cdf(x, dof), abs=1e-9)
    assert t_cdf(-x, dof) == pytest.approx(1 - t_cdf(x, dof), abs=1e-12)


@pytest.mark.parametrize(
    ("dof", "printed"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]
)
def test_t_quantile_matches_the_table(dof, printed):
    assert t_quantile(0.975, dof) == pytest.approx(printed, abs=1e-4)


def test_mean_interval():
    interval = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.estimate == 3.0
    assert (interval.low, interval.high) == (
        pytest.approx(3 - half, abs=1e-6),
        pytest.approx(3 + half, abs=1e-6),
    )
    assert mean_interval([0.7]).low == 0.7
    with pytest.raises(ValueError):
        mean_interval([])


def enumerated_mcnemar(b: int, c: int) -> Fraction:
    """Two-sided: the probability of every split of the n discordant samples at least as far from n/2."""
    n = b + c
    distance = abs(Fraction(b) - Fraction(n, 2))
    return sum(
        (
            Fraction(math.comb(n, i), 2**n)
            for i in range(n + 1)
            if abs(Fraction(i) - Fraction(n, 2)) >= distance
        ),
        Fraction(0),
    )


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (1, 1), (2, 7), (7, 2), (0, 10), (12, 20), (40, 40)])
def test_mcnemar_matches_the_enumerated_binomial(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(float(min(Fraction(1), enumerated_mcnemar(b, c))), rel=1e-12)


def test_paired_comparison_counts_the_discordant_samples():
    baseline = [True, True, False, False, True, False]
    condition = [True, False, True, True, True, False]
    paired = paired_comparison(baseline, condition)
    assert (paired.baseline_only, paired.condition_only) == (1, 2)
    assert paired.delta == pytest.approx(1 / 6)
    assert paired.p_value == mcnemar_exact(1, 2) == 1.0
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    baseline = [i % 3 == 0 for i in range(60)]
    condition = [i % 2 == 0 for i in range(60)]
    first = paired_bootstrap(baseline, condition, resamples=2000, seed=5)
    assert first == paired_bootstrap(baseline, condition, resamples=2000, seed=5)
    assert first.estimate == pytest.approx(sum(condition) / 60 - sum(baseline) / 60)
    assert first.low < first.estimate < first.high
    same = paired_bootstrap(baseline, baseline, resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
