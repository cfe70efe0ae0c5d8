"""Per-arm outcome statistics and tests against the control arm.

Binary outcomes (every outcome ``true``/``false``): rate with a Wilson score interval; against the
control, Pearson's chi-square on the 2x2 table (Yates-corrected), or Fisher's exact test when an
expected cell count is below 5. Numeric outcomes (any number; booleans then count as 1/0): mean
with a Student t interval; against the control, Welch's t-test. P-values are also given
Holm-adjusted over the arms of one experiment, for reading several arms at once.

Offline runs score every unit in every arm, so there the arms are compared unit by unit (paired):
exact McNemar test for binary outcomes, paired t-test for numeric ones. Live traffic puts each
unit in one arm only: independent samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats

from kn_steer.ab.log import Joined

OutcomeKind = Literal["binary", "numeric", "none"]


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


@dataclass
class ArmStats:
    arm: str
    requests: int
    errors: int
    outcomes: int
    successes: int | None = None
    value: Interval | None = None
    std: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_mean_s: float | None = None
    latency_p95_s: float | None = None
    is_control: bool = False
    vs_control: Comparison | None = None


@dataclass
class ExperimentStats:
    experiment: str
    control: str
    kind: OutcomeKind
    confidence: float
    arms: list[ArmStats] = field(default_factory=list)
    paired: bool = False  # arms compared unit by unit (McNemar / paired t) rather than as independent samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def outcome_kind(rows: Sequence[Joined]) -> OutcomeKind:
    values = [r.outcome for r in rows if r.outcome is not None]
    if not values:
        return "none"
    return "binary" if all(isinstance(v, bool) for v in values) else "numeric"


def experiment_stats(
    experiment: str, rows: Sequence[Joined], arm_order: Sequence[str] | None = None,
    control: str | None = None, confidence: float = 0.95, paired: bool | None = None,
) -> ExperimentStats:
    """Statistics of one experiment's requests, every arm compared with ``control``."""
    by_arm: dict[str, list[Joined]] = {}
    for arm in arm_order or ():
        by_arm[arm] = []
    for row in rows:
        by_arm.setdefault(row.record.arm, []).append(row)
    if control is None:
        flagged = [r.record.arm for r in rows if getattr(r.record, "is_control", False)]
        control = flagged[0] if flagged else ("control" if "control" in by_arm else next(iter(by_arm), ""))
    kind = outcome_kind(rows)
    result = ExperimentStats(experiment, control, kind, confidence)

    def values(arm_rows: list[Joined]) -> list[float]:
        return [float(r.outcome) for r in arm_rows if r.outcome is not None]

    for arm, arm_rows in by_arm.items():
        latencies = [r.record.latency_s for r in arm_rows if r.record.latency_s is not None]
        s = ArmStats(
            arm=arm, requests=len(arm_rows), errors=sum(r.record.error for r in arm_rows),
            outcomes=sum(r.outcome is not None for r in arm_rows), is_control=arm == control,
            prompt_tokens=sum(r.record.usage.prompt_tokens or 0 for r in arm_rows),
            completion_tokens=sum(r.record.usage.completion_tokens or 0 for r in arm_rows),
            latency_mean_s=float(np.mean(latencies)) if latencies else None,
            latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
        )
        vals = values(arm_rows)
        if kind == "binary":
            s.successes = int(sum(vals))
            s.value = wilson(s.successes, len(vals), confidence)
        elif kind == "numeric":
            s.value = t_interval(vals, confidence)
            s.std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        result.arms.append(s)

    if paired is None:  # offline runs score every unit in every arm: compare unit by unit
        paired = bool(rows) and all(r.record.assignment == "offline" and r.record.unit is not None for r in rows)
    result.paired = paired
    control_vals = values(by_arm.get(control, []))
    control_by_unit = {r.record.unit: r.outcome for r in by_arm.get(control, []) if r.outcome is not None}
    if kind != "none" and control_vals:
        for s, (arm, arm_rows) in zip(result.arms, by_arm.items()):
            vals = values(arm_rows)
            if arm == control or not vals:
                continue
            if paired:
                pairs = [(r.outcome, control_by_unit[r.record.unit]) for r in arm_rows
                         if r.outcome is not None and r.record.unit in control_by_unit]
                if not pairs:
                    continue
                if kind == "binary":
                    s.vs_control = compare_paired_binary([(bool(a), bool(c)) for a, c in pairs])
                else:
                    s.vs_control = compare_paired_numeric([(float(a), float(c)) for a, c in pairs])
            elif kind == "binary":
                s.vs_control = compare_binary(int(sum(vals)), len(vals), int(sum(control_vals)), len(control_vals))
            else:
                s.vs_control = compare_numeric(vals, control_vals)
        compared = [s for s in result.arms if s.vs_control is not None]
        for s, p in zip(compared, holm([s.vs_control.p_value for s in compared])):  # type: ignore[union-attr]
            s.vs_control.p_holm = p  # type: ignore[union-attr]
    return result
