"""Per-arm outcome statistics and tests against the control arm.

An experiment's outcome type is the one its config declares, else the type of its first outcome
in the log; outcomes of the other type are left out and counted (``ignored_outcomes``), so one
stray number never turns a rate into a mean (the server refuses them in the first place).

Binary outcomes (``true``/``false``): rate with a Wilson score interval, inside [0, 1]; against
the control, Pearson's chi-square on the 2x2 table (Yates-corrected), or Fisher's exact test when
an expected cell count is below 5. Numeric outcomes: mean with a Student t interval, cut to the
declared ``outcome_range`` when there is one; against the control, Welch's t-test. P-values are
also given Holm-adjusted over the arms of one experiment, for reading several arms at once.

Offline runs score every unit in every arm, so there the arms are compared unit by unit (paired):
exact McNemar test for binary outcomes, paired t-test for numeric ones. Live traffic puts each
unit in one arm only: independent samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from kn_steer.ab.log import Joined
from kn_steer.stats import (
    Comparison,
    Interval,
    compare_binary,
    compare_numeric,
    compare_paired_binary,
    compare_paired_numeric,
    holm,
    t_interval,
    wilson,
)

OutcomeKind = Literal["binary", "numeric", "none"]


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
    kind_source: str = "none"  # "declared" (config) or "first outcome" (inferred from the log)
    outcome_range: tuple[float, float] | None = None  # declared bounds of numeric outcomes
    ignored_outcomes: int = 0  # outcomes of the other type than the experiment's, left out
    reused_ids: int = 0  # requests logged under an id an earlier request already had

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_kind(rows: Sequence[Joined]) -> OutcomeKind:
    """The type of the experiment's first outcome in the log ("none" before any)."""
    with_outcome = [(r.outcome_line if r.outcome_line is not None else math.inf, k, r)
                    for k, r in enumerate(rows) if r.outcome is not None]
    if not with_outcome:
        return "none"
    first = min(with_outcome, key=lambda t: t[:2])[2]
    return "binary" if isinstance(first.outcome, bool) else "numeric"


def _clipped(interval: Interval, bounds: tuple[float, float] | None) -> Interval:
    """A t interval cut to the outcomes' declared range (a mean cannot leave it)."""
    if bounds is None:
        return interval
    low, high = bounds

    def cut(x: float) -> float:
        return x if math.isnan(x) else min(max(x, low), high)

    return Interval(interval.estimate, cut(interval.low), cut(interval.high))


def experiment_stats(
    experiment: str, rows: Sequence[Joined], arm_order: Sequence[str] | None = None,
    control: str | None = None, confidence: float = 0.95, paired: bool | None = None,
    kind: Literal["binary", "numeric"] | None = None, outcome_range: tuple[float, float] | None = None,
) -> ExperimentStats:
    """Statistics of one experiment's requests, every arm compared with ``control``.

    ``kind``/``outcome_range``: the experiment's declared outcome type and numeric bounds; without
    ``kind`` the first outcome in the log sets it.
    """
    by_arm: dict[str, list[Joined]] = {}
    for arm in arm_order or ():
        by_arm[arm] = []
    for row in rows:
        by_arm.setdefault(row.record.arm, []).append(row)
    if control is None:
        flagged = [r.record.arm for r in rows if getattr(r.record, "is_control", False)]
        control = flagged[0] if flagged else ("control" if "control" in by_arm else next(iter(by_arm), ""))
    source = "declared" if kind is not None else "first outcome"
    kind_: OutcomeKind = kind if kind is not None else outcome_kind(rows)
    if kind_ == "none":
        source = "none"
    result = ExperimentStats(experiment, control, kind_, confidence, kind_source=source,
                             outcome_range=outcome_range if kind_ == "numeric" else None)

    def fits(row: Joined) -> bool:
        """An outcome of the experiment's type (and inside its declared range)."""
        if row.outcome is None or isinstance(row.outcome, bool) != (kind_ == "binary"):
            return False
        return outcome_range is None or outcome_range[0] <= float(row.outcome) <= outcome_range[1]

    result.ignored_outcomes = sum(r.outcome is not None and not fits(r) for r in rows)

    def values(arm_rows: list[Joined]) -> list[float]:
        return [float(r.outcome) for r in arm_rows if fits(r)]

    for arm, arm_rows in by_arm.items():
        latencies = [r.record.latency_s for r in arm_rows if r.record.latency_s is not None]
        s = ArmStats(
            arm=arm, requests=len(arm_rows), errors=sum(r.record.error for r in arm_rows),
            outcomes=sum(fits(r) for r in arm_rows), is_control=arm == control,
            prompt_tokens=sum(r.record.usage.prompt_tokens or 0 for r in arm_rows),
            completion_tokens=sum(r.record.usage.completion_tokens or 0 for r in arm_rows),
            latency_mean_s=float(np.mean(latencies)) if latencies else None,
            latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
        )
        vals = values(arm_rows)
        if kind_ == "binary":
            s.successes = int(sum(vals))
            s.value = wilson(s.successes, len(vals), confidence)
        elif kind_ == "numeric":
            s.value = _clipped(t_interval(vals, confidence), outcome_range)
            s.std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        result.arms.append(s)

    if paired is None:  # offline runs score every unit in every arm: compare unit by unit
        paired = bool(rows) and all(r.record.assignment == "offline" and r.record.unit is not None for r in rows)
    result.paired = paired
    control_vals = values(by_arm.get(control, []))
    control_by_unit = {r.record.unit: r.outcome for r in by_arm.get(control, []) if fits(r)}
    if kind_ != "none" and control_vals:
        for s, (arm, arm_rows) in zip(result.arms, by_arm.items()):
            vals = values(arm_rows)
            if arm == control or not vals:
                continue
            if paired:
                pairs = [(r.outcome, control_by_unit[r.record.unit]) for r in arm_rows
                         if fits(r) and r.record.unit in control_by_unit]
                if not pairs:
                    continue
                if kind_ == "binary":
                    s.vs_control = compare_paired_binary([(bool(a), bool(c)) for a, c in pairs])
                else:
                    s.vs_control = compare_paired_numeric([(float(a), float(c)) for a, c in pairs])
            elif kind_ == "binary":
                s.vs_control = compare_binary(int(sum(vals)), len(vals), int(sum(control_vals)), len(control_vals))
            else:
                s.vs_control = compare_numeric(vals, control_vals)
        compared = [s for s in result.arms if s.vs_control is not None]
        for s, p in zip(compared, holm([s.vs_control.p_value for s in compared])):  # type: ignore[union-attr]
            s.vs_control.p_holm = p  # type: ignore[union-attr]
    return result
