"""What a neuron set contains: counts per layer, top neurons, and the tokens each neuron touches.

A neuron reads the residual stream through its row of the MLP input projection (up/fc) and
writes to it through its column of the output projection (down/proj). Projecting either
direction through the unembedding (as in Geva et al. 2022) names the vocabulary it relates to:
the read direction's top tokens are what the neuron responds to, the write direction's top and
bottom tokens are what a *positive* activation promotes and suppresses (a negative activation
swaps the two). No final-norm or bias terms are applied: this is a label, not a prediction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kn_steer.fileio import atomic_savefig
from kn_steer.sets.format import ModelIdentity, Neuron, NeuronSet


@dataclass(frozen=True)
class TokenScore:
    """One vocabulary entry and its logit along a neuron's direction."""

    token_id: int
    text: str
    logit: float


@dataclass(frozen=True)
class NeuronTokens:
    """The tokens one neuron reads, promotes and suppresses through the unembedding."""

    layer: int
    index: int
    score: float | None
    reads: list[TokenScore]
    promotes: list[TokenScore]
    suppresses: list[TokenScore]


def check_set_model(ns: NeuronSet, model: str) -> tuple[Any, ModelIdentity]:
    """(ModelRef, identity) of ``model``; refuses a model other than the set's, from config only."""
    from transformers import AutoConfig

    from kn_steer.models import resolve_model
    from kn_steer.sets.format import model_identity

    ref = resolve_model(model)
    identity = model_identity(ref, AutoConfig.from_pretrained(ref.path))
    ns.check_model(identity)
    return ref, identity


def _top_tokens(logits: torch.Tensor, tokenizer: Any, k: int, largest: bool) -> list[list[TokenScore]]:
    values, ids = torch.topk(logits, k=min(k, logits.shape[-1]), dim=-1, largest=largest)
    return [
        [TokenScore(int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values.tolist(), ids.tolist())
    ]


@torch.no_grad()
def neuron_tokens(
    model: torch.nn.Module, tokenizer: Any, neurons: Sequence[Neuron], k: int = 5
) -> list[NeuronTokens]:
    """For each neuron, the top-``k`` tokens of its read and write directions (and bottom-``k``)."""
    from kn_steer.models.families import adapter_for_config
    from kn_steer.models.sites import read_vectors, write_vectors

    if not neurons:
        return []
    adapter = adapter_for_config(model.config)
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, hidden]
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    reads, writes = [], []
    for n in neurons:
        if n.layer not in by_layer:
            by_layer[n.layer] = (read_vectors(model, n.layer, adapter), write_vectors(model, n.layer, adapter))
        r, w = by_layer[n.layer]
        reads.append(r[n.index])
        writes.append(w[n.index])
    read_logits = torch.stack(reads).float().to(unembed.device) @ unembed.T  # [n, vocab]
    write_logits = torch.stack(writes).float().to(unembed.device) @ unembed.T
    read_top = _top_tokens(read_logits, tokenizer, k, largest=True)
    promote = _top_tokens(write_logits, tokenizer, k, largest=True)
    suppress = _top_tokens(write_logits, tokenizer, k, largest=False)
    return [
        NeuronTokens(n.layer, n.index, n.score, read_top[j], promote[j], suppress[j])
        for j, n in enumerate(neurons)
    ]


MAX_PLOT_LABELS = 20  # beyond this many, labels would crowd a 10-inch plot; the table lists the rest
_OFFSETS_PX = [(float(dx), float(dy)) for dx in range(-480, 481, 12) for dy in range(-240, 241, 8)
               if math.hypot(dx, dy) >= 8]  # where a label may sit relative to its point
_SAMPLES = 48  # points along a leader line (at most ~11 px apart) when testing what it runs through
# Placement costs: the hard rules (inside the axes, no label on a label, no leader through a
# label) outweigh everything; then crossings and covered points; then distance from the point.
_COST_OUTSIDE, _COST_ON_LABEL, _COST_THROUGH_LABEL = 1e6, 1e5, 1e4
_COST_LEADERS_CROSS, _COST_ON_LABELLED_DOT, _COST_ON_DOT, _COST_LEADER_ON_DOT = 300, 500, 20, 2
_COST_PER_PX_ACROSS, _COST_PER_PX_UP_DOWN = 0.1, 0.3  # a label level with its point reads best


def _covered(boxes: np.ndarray, points: np.ndarray, pad: float) -> np.ndarray:
    """[boxes, points]: whether each point lies in each box grown by ``pad``."""
    return ((points[None, :, 0] >= boxes[:, None, 0] - pad) & (points[None, :, 0] <= boxes[:, None, 2] + pad)
            & (points[None, :, 1] >= boxes[:, None, 1] - pad) & (points[None, :, 1] <= boxes[:, None, 3] + pad))


def _clutter(boxes: np.ndarray, ends: np.ndarray, anchor: np.ndarray, placed: np.ndarray, leaders: np.ndarray,
             dots: np.ndarray, labelled_dots: np.ndarray, dot_radius: float) -> np.ndarray:
    """Cost of each candidate label box (and its leader from ``anchor`` to ``ends``) for what it
    covers or crosses: placed labels and leaders, labelled and other points."""
    t = np.linspace(0, 1, _SAMPLES)[1:-1]
    cost = _COST_ON_LABELLED_DOT * _covered(boxes, labelled_dots, dot_radius).sum(axis=1).astype(float)
    cost += _COST_ON_DOT * _covered(boxes, dots, dot_radius).sum(axis=1)
    starts = np.broadcast_to(anchor, ends.shape)
    cost += _COST_LEADER_ON_DOT * _near_segment(starts, ends, dots, dot_radius)
    if len(placed):
        on_label = ((boxes[:, None, 0] < placed[None, :, 2] + 2) & (placed[None, :, 0] < boxes[:, None, 2] + 2)
                    & (boxes[:, None, 1] < placed[None, :, 3] + 2) & (placed[None, :, 1] < boxes[:, None, 3] + 2))
        cost += _COST_ON_LABEL * on_label.sum(axis=1)
        path = anchor[None, None, :] + t[None, :, None] * (ends - anchor)[:, None, :]  # [candidates, samples, 2]
        through = _covered(placed, path.reshape(-1, 2), 2).reshape(len(placed), len(boxes), -1).any(axis=2)
        cost += _COST_THROUGH_LABEL * through.sum(axis=0)  # this leader through a placed label
        old = leaders[:, 0, None, :] + t[None, :, None] * (leaders[:, 1, None, :] - leaders[:, 0, None, :])
        cost += _COST_THROUGH_LABEL * _covered(boxes, old.reshape(-1, 2), 2).sum(axis=1)  # and the reverse
        cost += _COST_LEADERS_CROSS * _crossings(np.concatenate([starts, ends], axis=1), leaders.reshape(-1, 4))
    return cost


def place_labels(ax: Any, anchors: Sequence[tuple[float, float]], texts: Sequence[str],
                 obstacles: Sequence[tuple[float, float]], fontsize: float = 8) -> list[Any]:
    """Annotate each anchor with its text and a leader line, placed so that no label overlaps
    another label or leaves the axes and no leader runs through a label (greedy, in the order
    given; among the free places, the one covering fewest points and nearest its anchor).

    Call it once the figure's layout and the axes limits are final: it works in display pixels.
    Every anchor is labelled; if no free place existed, the least bad one is used.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_px, to_data = ax.transData.transform, ax.transData.inverted().transform
    dot_radius = 3.5 * fig.dpi / 72  # plotted markers (s=18-22: about 4.5 pt across)
    dots = np.asarray(to_px(np.asarray(obstacles, float).reshape(-1, 2)))
    labelled_dots = np.asarray(to_px(np.asarray(anchors, float).reshape(-1, 2)))
    offsets = np.asarray(_OFFSETS_PX) * fig.dpi / 110  # laid out for 110 dpi
    # a label sits with its side or corner facing the point at the offset
    side = np.sign(offsets) * (np.abs(offsets / np.hypot(offsets[:, :1], offsets[:, 1:])) > 0.3)
    distance = _COST_PER_PX_ACROSS * np.abs(offsets[:, 0]) + _COST_PER_PX_UP_DOWN * np.abs(offsets[:, 1])
    placed, leaders, artists = np.zeros((0, 4)), np.zeros((0, 2, 2)), []
    for anchor, text in zip(labelled_dots, texts):
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        size = np.array([extent.width, extent.height])
        ends = anchor + offsets  # where each candidate's leader meets its label
        lower_left = ends - size * (1 - side) / 2
        boxes = np.concatenate([lower_left, lower_left + size], axis=1)
        inside = ((boxes[:, 0] >= frame.x0 + 2) & (boxes[:, 1] >= frame.y0 + 2)
                  & (boxes[:, 2] <= frame.x1 - 2) & (boxes[:, 3] <= frame.y1 - 2))
        base = distance + _COST_OUTSIDE * ~inside
        # nearest candidates first, in chunks: stop once no farther one can beat the best found
        order = np.argsort(base, kind="stable")
        best, best_cost = int(order[0]), math.inf
        for chunk in np.array_split(order, max(1, len(order) // 400)):
            if base[chunk[0]] >= best_cost:
                break
            cost = base[chunk] + _clutter(boxes[chunk], ends[chunk], anchor, placed, leaders, dots,
                                          labelled_dots, dot_radius)
            k = int(np.argmin(cost))
            if cost[k] < best_cost:
                best, best_cost = int(chunk[k]), float(cost[k])
        box, end = boxes[best], ends[best]
        placed = np.vstack([placed, box])
        leaders = np.concatenate([leaders, [[anchor, end]]])
        relpos = tuple((end - box[:2]) / size)  # the leader starts exactly where it was checked
        arrow = dict(arrowstyle="-", color="0.45", lw=0.6, shrinkA=0, shrinkB=2, relpos=relpos, patchA=None)
        artists.append(ax.annotate(text, tuple(to_data(anchor)), xytext=tuple(to_data(box[:2])), textcoords="data",
                                   ha="left", va="bottom", fontsize=fontsize, arrowprops=arrow,
                                   annotation_clip=False))
    return artists


def _crossings(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """For each segment in ``new`` [n, 4], how many of ``old`` [m, 4] it properly crosses."""
    if not len(old):
        return np.zeros(len(new))
    a, b = new[:, None, :2], new[:, None, 2:]
    c, d = old[None, :, :2], old[None, :, 2:]

    def side(o, p, q):
        return (p[..., 0] - o[..., 0]) * (q[..., 1] - o[..., 1]) - (p[..., 1] - o[..., 1]) * (q[..., 0] - o[..., 0])

    return ((side(c, d, a) * side(c, d, b) < 0) & (side(a, b, c) * side(a, b, d) < 0)).sum(axis=1)


def _near_segment(starts: np.ndarray, ends: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """For each segment [n, 2] -> [n, 2], how many ``points`` lie within ``radius`` of it, leaving
    out its own start (the labelled point)."""
    v = (ends - starts)[:, None, :]
    w = points[None, :, :] - starts[:, None, :]
    along = np.clip((w * v).sum(axis=2) / np.maximum((v * v).sum(axis=2), 1e-9), 0, 1)
    dist = np.hypot(*(w - along[..., None] * v).transpose(2, 0, 1))
    own = np.hypot(*w.transpose(2, 0, 1)) < 1e-6
    return ((dist < radius) & ~own).sum(axis=1)


def distribution_figure(ns: NeuronSet, annotate: int = 10) -> Any:
    """Score against layer (top; the ``annotate`` best neurons labelled ``L<layer>.<index>``, at
    most :data:`MAX_PLOT_LABELS`) and neurons per layer (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(ns.model.num_layers))
    counts = ns.counts_per_layer()
    scored = [n for n in ns.neurons if n.score is not None]
    fig, (ax_score, ax_count) = plt.subplots(
        2, 1, figsize=(10, 6.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    labelled = [n for n in ns.top(min(annotate, MAX_PLOT_LABELS)) if n.score is not None] if scored else []
    title = (f"{ns.name}: {len(ns.neurons)} neurons ({ns.method.name}) on {ns.model.name}, "
             f"{ns.model.num_layers} layers x {ns.model.intermediate_size}")
    if labelled:
        title += f"\ntop {len(labelled)} by score labelled L<layer>.<index>"

    # A small deterministic jitter separates neurons of one layer without hiding their layer.
    def x_of(n: Neuron) -> float:
        return n.layer + ((n.index * 2654435761) % 1000 / 1000 - 0.5) * 0.35

    if scored:
        ax_score.scatter([x_of(n) for n in scored], [n.score for n in scored],
                         s=18, alpha=0.7, color="tab:blue", edgecolors="none")
        if labelled:  # the labelled neurons stand out from their neighbours, so leaders are readable
            ax_score.scatter([x_of(n) for n in labelled], [n.score for n in labelled],
                             s=22, color="tab:red", edgecolors="black", linewidths=0.5, zorder=3)
        ax_score.set_ylabel("score")
        low, high = min(n.score for n in scored), max(n.score for n in scored)
        span = (high - low) or abs(high) or 1.0
        # headroom above and below for labels; the lower limit keeps 0 in view for positive scores
        ax_score.set_ylim(min(0.0, low - 0.08 * span) if low >= 0 else low - 0.08 * span, high + 0.3 * span)
    else:
        ax_score.text(0.5, 0.5, "this set has no scores", ha="center", va="center",
                      transform=ax_score.transAxes)
        ax_score.set_yticks([])
    ax_score.grid(alpha=0.3)
    ax_score.set_title(title, fontsize=10)
    ax_count.bar(layers, [counts.get(l, 0) for l in layers], color="tab:orange")
    ax_count.set_ylabel("neurons")
    ax_count.set_xlabel("layer")
    ax_count.set_xlim(-0.8, ns.model.num_layers - 0.2)
    ax_count.set_xticks(layers[:: max(1, len(layers) // 15)])
    ax_count.yaxis.get_major_locator().set_params(integer=True)
    ax_count.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if labelled:  # after the layout: labels are placed in final pixel positions
        ax_score.set_xlim(ax_score.get_xlim())
        ax_score.set_ylim(ax_score.get_ylim())
        fig.canvas.draw()
        place_labels(ax_score, [(x_of(n), n.score) for n in labelled], [f"L{n.layer}.{n.index}" for n in labelled],
                     [(x_of(n), n.score) for n in scored])
    return fig


def plot_distribution(ns: NeuronSet, path: str | os.PathLike, annotate: int = 10) -> Path:
    """:func:`distribution_figure` as a PNG, written atomically."""
    return atomic_savefig(distribution_figure(ns, annotate), Path(path))
