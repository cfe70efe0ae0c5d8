"""Summaries of scored items: accuracy per scoring rule, split by relative length, and paired tests.

Every condition (unsteered, a set, a random control) is scored on the same items, so conditions
are compared item by item with the exact McNemar test (:func:`kn_steer.stats.compare_paired_binary`).
Random controls are summarized over seeds (mean, sd) with each seed's own tests beside.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from kn_steer.eval.scoring import LENGTH_GROUPS, RULES, ItemScore
from kn_steer.stats import compare_paired_binary


def rules_of(scores: Sequence[ItemScore]) -> tuple[str, ...]:
    """The rules these scores support (``calibrated`` needs the neutral-premise scores)."""
    return RULES if scores and all(s.neutral is not None for s in scores) else RULES[:2]


def _rate(values: Sequence[bool]) -> float | None:
    """The share of True values; None for no values (JSON has no NaN, and None == None)."""
    return sum(values) / len(values) if values else None


def rule_summary(scores: Sequence[ItemScore], rule: str) -> dict[str, Any]:
    """Accuracy and trap rate under ``rule``, and accuracy by the correct choice's relative length."""
    with_trap = [s for s in scores if s.trap is not None]
    by_length = {}
    for group in LENGTH_GROUPS:
        members = [s for s in scores if s.length_group == group]
        by_length[group] = {"n": len(members), "accuracy": _rate([s.correct_by(rule) for s in members])}
    return {"accuracy": _rate([s.correct_by(rule) for s in scores]),
            "trap_rate": _rate([s.trapped_by(rule) for s in with_trap]), "by_length": by_length}


def summarize(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """``n``, the ``total`` rule's accuracy / trap rate / mean margin (the headline), and every
    supported rule under ``rules``."""
    n = len(scores)
    headline = rule_summary(scores, "total")
    margin = (sum(s.logprobs[s.faithful] - max(v for i, v in enumerate(s.logprobs) if i != s.faithful)
                  for s in scores) / n) if n else None
    return {"n": n, "accuracy": headline["accuracy"], "trap_rate": headline["trap_rate"], "mean_margin": margin,
            "rules": {rule: rule_summary(scores, rule) for rule in rules_of(scores)}}


def paired(arm: Sequence[ItemScore], control: Sequence[ItemScore], rule: str) -> dict[str, Any]:
    """Exact McNemar test of ``arm`` against ``control`` (same items, same order) under ``rule``."""
    if [a.id for a in arm] != [c.id for c in control]:
        raise ValueError("paired comparison needs the same items in the same order")
    pairs = [(a.correct_by(rule), c.correct_by(rule)) for a, c in zip(arm, control)]
    result = compare_paired_binary(pairs)
    return {"p_value": result.p_value, "difference": result.difference,
            "items_won": sum(1 for a, c in pairs if a and not c), "items_lost": sum(1 for a, c in pairs if c and not a)}


def mean_sd(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample sd over seeds (None when a value is missing)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "sd": None}
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def control_summary(seeds: Sequence[Sequence[ItemScore]], unsteered: Sequence[ItemScore],
                    steered: Sequence[ItemScore] | None, rule: str) -> dict[str, Any]:
    """A random control over seeds under ``rule``: accuracy and trap rate (mean, sd), and per seed
    the McNemar tests control-vs-unsteered and set-vs-control."""
    per_seed = []
    for k, scores in enumerate(seeds):
        row = {"seed": k, **{key: v for key, v in rule_summary(scores, rule).items() if key != "by_length"},
               "vs_unsteered": paired(scores, unsteered, rule)}
        if steered is not None:
            row["set_vs_this"] = paired(steered, scores, rule)
        per_seed.append(row)
    out = {"accuracy": mean_sd([r["accuracy"] for r in per_seed]),
           "trap_rate": mean_sd([r["trap_rate"] for r in per_seed]),
           "p_vs_unsteered": [r["vs_unsteered"]["p_value"] for r in per_seed], "per_seed": per_seed}
    if steered is not None:
        out["p_set_vs_control"] = [r["set_vs_this"]["p_value"] for r in per_seed]
    return out
