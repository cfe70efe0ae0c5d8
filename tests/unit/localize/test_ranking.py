"""The vectorised average-precision scorer agrees with a slow per-column reference."""

from __future__ import annotations

import numpy as np
import torch

from kn_steer.localize.ranking import average_precision, label_ap


def slow_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's definition: sum over distinct thresholds of (R_k - R_{k-1}) * P_k."""
    n_pos = labels.sum()
    total, prev_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        tp = (labels & chosen).sum()
        recall = tp / n_pos
        total += (recall - prev_recall) * (tp / chosen.sum())
        prev_recall = recall
    return float(total)


def test_ap_matches_slow_reference_with_ties() -> None:
    rng = np.random.default_rng(0)
    n, k = 60, 40
    scores = rng.normal(size=(n, k))
    scores[:, :10] = np.round(scores[:, :10])  # many ties in some columns
    scores[:, 10] = 1.0  # all tied
    labels = rng.random(n) < 0.3
    fast = average_precision(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels), chunk=7)
    slow = np.array([slow_ap(scores[:, j].astype(np.float32), labels) for j in range(k)])
    np.testing.assert_allclose(fast.numpy(), slow, rtol=1e-9, atol=1e-12)
    assert abs(float(fast[10]) - labels.mean()) < 1e-12  # a constant scorer gets the prevalence


def test_perfect_and_reversed_scorers() -> None:
    labels = torch.tensor([True, True, False, False, False])
    scores = torch.tensor([[5.0, -5.0], [4.0, -4.0], [1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    ap = average_precision(scores, labels)
    assert float(ap[0]) == 1.0
    assert float(ap[1]) < 0.5


def test_one_sort_serves_every_label() -> None:
    rng = np.random.default_rng(1)
    scores = torch.tensor(rng.normal(size=(30, 12)), dtype=torch.float32)
    labels = [("a", "b", "c")[i % 3] for i in range(30)]
    both = label_ap(scores, labels, ["a", "c"])
    for name in ("a", "c"):
        alone = average_precision(scores, torch.tensor([lab == name for lab in labels]))
        torch.testing.assert_close(both[name], alone)
