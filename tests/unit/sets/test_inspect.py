"""The inspect plot labels every top neuron it promises, with no label on another label or on the
title, every label inside the score axes, and no leader line through another label.

Checked on the shipped sets whose layouts are hardest: MemoTrap's 80 neurons with the top ones
packed at the right edge (layer 29), and P37's 100 neurons labelled 20 at a time.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text

from helpers.paths import ROOT
from kn_steer.sets.format import NeuronSet
from kn_steer.sets.inspect import MAX_PLOT_LABELS, distribution_figure


def label_layout(fig):
    """(label texts, their pixel boxes, their leader segments, the score axes' box, title box)."""
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    labels = [c for c in ax.texts if c.arrowprops is not None]
    # the label's own text box (an Annotation's extent would include its leader line)
    boxes = np.array([Text.get_window_extent(t, renderer).extents for t in labels])
    leaders = []
    for t, box in zip(labels, boxes):
        start = (box[0] + t.arrowprops["relpos"][0] * (box[2] - box[0]),
                 box[1] + t.arrowprops["relpos"][1] * (box[3] - box[1]))
        leaders.append((start, tuple(ax.transData.transform(t.xy))))
    return [t.get_text() for t in labels], boxes, leaders, ax.get_window_extent(renderer).extents, \
        ax.title.get_window_extent(renderer).extents


def crosses(p, q, box) -> bool:
    points = np.linspace(p, q, 200)[1:-1]
    return bool(((points[:, 0] > box[0]) & (points[:, 0] < box[2])
                 & (points[:, 1] > box[1]) & (points[:, 1] < box[3])).any())


@pytest.mark.parametrize("name, top", [("smollm2-135m-context-memotrap", 10), ("smollm2-135m-relation-P37", 20),
                                       ("smollm2-135m-relation-P36", 10)])
def test_every_top_neuron_is_labelled_without_overlaps(name, top):
    ns = NeuronSet.load(ROOT / "neuron_sets" / f"{name}.json")
    fig = distribution_figure(ns, annotate=top)
    texts, boxes, leaders, frame, title = label_layout(fig)
    assert texts == [f"L{n.layer}.{n.index}" for n in ns.top(top)]  # all of them, best first
    for i, box in enumerate(boxes):
        assert frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3], texts[i]
        assert box[1] > title[3] or box[3] < title[1] or box[2] < title[0] or box[0] > title[2]
        for j, other in enumerate(boxes[:i]):
            apart = box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1]
            assert apart, (texts[i], texts[j])
        for j, (p, q) in enumerate(leaders):
            if j != i:
                assert not crosses(p, q, box), f"leader of {texts[j]} runs through {texts[i]}"
    plt.close(fig)


def test_labels_are_capped_and_said_so():
    ns = NeuronSet.load(ROOT / "neuron_sets" / "smollm2-135m-relation-P407.json")
    fig = distribution_figure(ns, annotate=50)
    texts, *_ = label_layout(fig)
    assert len(texts) == MAX_PLOT_LABELS
    assert f"top {MAX_PLOT_LABELS} by score labelled" in fig.axes[0].get_title()
    bare = distribution_figure(ns, annotate=0)
    assert len(bare.axes[0].texts) == 0 and "labelled" not in bare.axes[0].get_title()
    plt.close(bare)
    plt.close(fig)
