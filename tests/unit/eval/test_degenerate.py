"""The degenerate-knowledge-neuron analysis without a model: the weight-structure split, the
degeneracy rule, corrupted completions and the summary's counts."""

from __future__ import annotations

import pytest
import torch

from kn_steer.eval.protocols.degenerate import corrupted_targets, degeneracy, drops, structural_split, summarize
from kn_steer.localize.methods.kn import KNExample


def test_structural_split_separates_two_direction_families() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    rows = torch.stack([a, 1.1 * a + 0.01 * b, b, 0.9 * b, a - 0.02 * b])
    labels = structural_split(rows)
    assert labels[0] == labels[1] == labels[4] != labels[2] == labels[3]
    assert structural_split(torch.ones(2, 4)) in ([0, 1], [1, 0])  # identical directions still split


def test_degeneracy_rule() -> None:
    assert drops(0.5, [0.25, 0.5, 0.0]) == [0.5, 0.0, 1.0]
    assert degeneracy(0.3, 0.2, 0.9) == {"degenerate": True, "complementarity": pytest.approx(1 - 0.3 / 0.9)}
    assert degeneracy(0.6, 0.1, 0.9)["degenerate"] is False  # one group alone removes the fact
    assert degeneracy(0.1, 0.1, 0.4)["degenerate"] is False  # the whole set does not remove it
    assert degeneracy(0.1, 0.1, 0.0)["complementarity"] is None


def test_corrupted_targets_come_from_the_same_relation() -> None:
    facts = [KNExample(id=f"P36:{i}", prompts=["x"], target=t, meta={"relation": "P36"})
             for i, t in enumerate([" Paris", " Rome", " Paris"])]
    facts.append(KNExample(id="P30:0", prompts=["y"], target=" Europe", meta={"relation": "P30"}))
    out = corrupted_targets(facts)
    assert out[0] == out[2] == " Rome" and out[1] == " Paris"
    assert out[3] != " Europe"  # a relation with one answer borrows another relation's


def test_summary_counts() -> None:
    rows = [{"drop_a": 0.2, "drop_b": 0.3, "drop_all": 0.9, "degenerate": True, "complementarity": 0.6,
             "random_split_degenerate": 0.2, "random_split_complementarity": 0.3, "drop_matched_all": 0.0,
             "factcheck_margin": 0.1, "factcheck_margin_matched": -0.1},
            {"drop_a": 0.9, "drop_b": 0.0, "drop_all": 0.95, "degenerate": False, "complementarity": 0.05,
             "random_split_degenerate": 0.0, "random_split_complementarity": 0.1, "drop_matched_all": 0.01,
             "factcheck_margin": -0.1, "factcheck_margin_matched": 0.1},
            {"drop_a": 0.0, "drop_b": 0.0, "drop_all": 0.1, "degenerate": False, "complementarity": 1.0,
             "random_split_degenerate": 0.0, "random_split_complementarity": 1.0, "drop_matched_all": 0.0,
             "factcheck_margin": 0.2, "factcheck_margin_matched": 0.0}]
    s = summarize(rows)
    assert s["removed_by_whole_set"] == 2 and s["degenerate"] == 1 and s["degenerate_share_of_removed"] == 0.5
    assert s["complementarity"] == pytest.approx((0.6 + 0.05) / 2)
    assert s["factcheck_degenerate"]["facts"] == 1 and s["factcheck_all"]["told_apart"] == pytest.approx(2 / 3)
