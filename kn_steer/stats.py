"""Statistics shared by evaluation protocols and A/B reports: intervals and significance tests.

Binary outcomes: a rate with a Wilson score interval; two independent samples compared with
Pearson's chi-square on the 2x2 table (Yates-corrected), or Fisher's exact test when an expected
cell count is below 5; paired samples (the same items under two conditions) with the exact
McNemar test. Numeric outcomes: a mean with a Student t interval; Welch's t-test, or the paired
t-test. Holm's adjustment for reading several comparisons at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass
class Interval:
    estimate: float
    low: float
    high: float


@dataclass
class Comparison:
    test: str  # "chi2" (Yates), "fisher" (exact), "welch" (t-test), "none" (nothing varies)
    p_value: float
    difference: float  # arm minus control (rate or mean)
    p_holm: float | None = None
    statistic: float | None = None


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (well behaved near 0 and 1, small n)."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a Student t interval (NaN bounds for fewer than two values)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if arr.size < 2:
        return Interval(mean, math.nan, math.nan)
    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, arr.size - 1)) * sem
    return Interval(mean, mean - half, mean + half)


def compare_binary(k1: int, n1: int, k0: int, n0: int) -> Comparison:
    """Arm (k1 of n1) against control (k0 of n0): chi-square, or Fisher exact for small counts."""
    table = np.array([[k1, n1 - k1], [k0, n0 - k0]], dtype=float)
    diff = k1 / n1 - k0 / n0
    if table.sum(axis=0).min() == 0:  # all successes or all failures: nothing to test
        return Comparison("none", 1.0, diff)
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    if expected.min() < 5:
        res = stats.fisher_exact(table.astype(int))
        return Comparison("fisher", float(res.pvalue), diff, statistic=float(res.statistic))
    chi2, p, _, _ = stats.chi2_contingency(table, correction=True)
    return Comparison("chi2", float(p), diff, statistic=float(chi2))


def compare_numeric(arm: Sequence[float], control: Sequence[float]) -> Comparison:
    """Welch's t-test (unequal variances)."""
    a, c = np.asarray(arm, float), np.asarray(control, float)
    diff = float(a.mean() - c.mean())
    if a.size < 2 or c.size < 2:
        return Comparison("none", math.nan, diff)
    if a.var(ddof=1) == 0 and c.var(ddof=1) == 0:
        return Comparison("none", 1.0 if diff == 0 else 0.0, diff)
    res = stats.ttest_ind(a, c, equal_var=False)
    return Comparison("welch", float(res.pvalue), diff, statistic=float(res.statistic))


def compare_paired_binary(pairs: Sequence[tuple[bool, bool]]) -> Comparison:
    """Exact McNemar test on (arm, control) outcomes of the same units: a binomial test of the
    discordant pairs. Used when every arm saw the same units (offline runs)."""
    wins = sum(1 for a, c in pairs if a and not c)
    losses = sum(1 for a, c in pairs if c and not a)
    diff = (wins - losses) / len(pairs)
    if wins + losses == 0:
        return Comparison("mcnemar", 1.0, diff, statistic=0.0)
    res = stats.binomtest(wins, wins + losses, 0.5)
    return Comparison("mcnemar", float(res.pvalue), diff, statistic=float(wins - losses))


def compare_paired_numeric(pairs: Sequence[tuple[float, float]]) -> Comparison:
    """Paired t-test on (arm, control) outcomes of the same units."""
    a = np.asarray([p[0] for p in pairs], float)
    c = np.asarray([p[1] for p in pairs], float)
    diff = float((a - c).mean())
    if a.size < 2:
        return Comparison("none", math.nan, diff)
    if np.all(a - c == (a - c)[0]):
        return Comparison("none", 1.0 if diff == 0 else 0.0, diff)
    res = stats.ttest_rel(a, c)
    return Comparison("paired-t", float(res.pvalue), diff, statistic=float(res.statistic))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_paired_signed_rank(pairs: Sequence[tuple[float, float]]) -> Comparison:
    """Wilcoxon signed-rank test on (arm, control) outcomes of the same units: for heavy-tailed
    numeric effects (relative changes of a probability) where the paired t-test is fragile.
    ``difference`` is the median of the paired differences."""
    d = np.asarray([a - c for a, c in pairs], float)
    diff = float(np.median(d)) if d.size else math.nan
    if d.size == 0 or np.all(d == 0):
        return Comparison("wilcoxon", 1.0 if d.size else math.nan, diff)
    res = stats.wilcoxon(d)
    return Comparison("wilcoxon", float(res.pvalue), diff, statistic=float(res.statistic))
