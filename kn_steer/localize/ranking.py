"""Ranking neurons by how well their activation detects a label: average precision, vectorised.

AP follows scikit-learn's ``average_precision_score``: the sum over score thresholds of (recall
step) x (precision at that threshold); tied scores form one threshold. One sort of each score
column serves every label column, since the sort is the expensive part.
"""

from __future__ import annotations

from typing import Sequence

import torch


def average_precision(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """AP of every column of ``scores`` ``[N, K]`` as a detector of ``labels`` ``[N]`` (bool): ``[K]``."""
    labels = labels.to(torch.bool).reshape(-1)
    return average_precision_multi(scores, labels[:, None], chunk)[0]


def average_precision_multi(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """AP for several label columns ``[N, R]`` at once: ``[R, K]``. Columns of ``scores`` are done
    ``chunk`` at a time to bound memory."""
    labels = labels.to(torch.bool)
    n, k = scores.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} rows, scores {n}")
    n_pos = labels.sum(0).to(torch.float64)  # [R]
    if bool((n_pos == 0).any()):
        raise ValueError("average precision needs at least one positive per label column")
    out = torch.empty(labels.shape[1], k, dtype=torch.float64)
    counts = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    for start in range(0, k, chunk):
        block = scores[:, start:start + chunk]
        sorted_scores, order = torch.sort(block, dim=0, descending=True, stable=True)
        # End of each tie group: the next row whose score differs (or the last row).
        is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
        is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
        rows = torch.arange(n)[:, None].expand_as(is_end)
        end_index = torch.where(is_end, rows, torch.full_like(rows, n))
        end_index = end_index.flip(0).cummin(0).values.flip(0)
        for r in range(labels.shape[1]):
            pos = labels[:, r][order].to(torch.float64)  # [N, C] labels in descending score order
            precision = (pos.cumsum(0) / counts).gather(0, end_index)
            out[r, start:start + chunk] = (precision * pos).sum(0) / n_pos[r]
    return out


def label_ap(activations: torch.Tensor, labels: Sequence[str], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per wanted label, the AP ``[K]`` of every column of ``activations`` ``[N, K]``."""
    matrix = torch.tensor([[lab == r for r in wanted] for lab in labels])
    ap = average_precision_multi(activations, matrix)
    return {r: ap[j] for j, r in enumerate(wanted)}


def top_flat(scores: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """``(layer, unit, score)`` of the ``k`` best entries of a ``[layers, units]`` matrix, best
    first; ties keep index order, so the first ``k`` are the same whatever ``k`` is asked for."""
    width = scores.shape[1]
    values, flat = torch.sort(scores.flatten(), descending=True, stable=True)
    return [(int(f) // width, int(f) % width, float(v)) for v, f in zip(values[:k].tolist(), flat[:k].tolist())]
