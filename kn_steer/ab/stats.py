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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
