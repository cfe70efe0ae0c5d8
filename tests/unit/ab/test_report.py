"""The A/B report plot: no text on other text (the "n=" notes used to hit the title), everything
inside the figure, rates drawn inside [0, 1] and means inside their declared range."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.text import Text

from kn_steer.ab.config import parse_config
from kn_steer.ab.log import AssignmentLog
from kn_steer.ab.report import build_report, figure


def write_log(path, experiment: str, arms: dict[str, float], n: int, numeric: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    log = AssignmentLog(path)
    for arm, level in arms.items():
        for i in range(n):
            rid = f"cmpl-{experiment}-{arm}-{i}"
            log.append({"type": "assignment", "request_id": rid, "experiment": experiment, "arm": arm,
                        "time": "t", "error": bool(rng.random() < 0.05)})
            value = float(np.clip(rng.normal(level, 1), 1, 5)) if numeric else bool(rng.random() < level)
            log.append({"type": "outcome", "request_id": rid, "outcome": value, "time": "t"})


def texts_of(fig) -> list[tuple[str, np.ndarray]]:
    """Every text drawn: titles, axis labels, annotations, and the tick labels inside the view."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = set()
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks():  # matplotlib keeps ticks outside the view, undrawn
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    hidden.update({id(tick.label1), id(tick.label2)})
    found = []
    for artist in fig.findobj(Text):
        if artist.get_visible() and artist.get_text().strip() and id(artist) not in hidden:
            found.append((artist.get_text(), np.asarray(Text.get_window_extent(artist, renderer).extents)))
    return found


def test_plot_text_never_overlaps_and_stays_in_the_figure(tmp_path):
    path = tmp_path / "ab.jsonl"
    rates = {"baseline-unsteered": 0.5, "ircan-x2-all": 0.55, "ircan-x4-all": 0.6, "ircan-x4-prompt": 0.98,
             "ircan-x8-generated": 0.99, "clamp0-prompt": 0.3}
    write_log(path, "rates", rates, 60, numeric=False, seed=1)
    write_log(path, "ratings", {"control": 3.0, "x0.5-all": 3.5, "clamp0-prompt": 4.9}, 30, numeric=True, seed=2)
    AssignmentLog(path).append({"type": "assignment", "request_id": "q", "experiment": "quiet", "arm": "a",
                                "time": "t"})
    config = parse_config({"experiments": [
        {"name": "rates", "control": "baseline-unsteered", "outcome": "binary",
         "arms": [{"name": name} for name in rates]},
        {"name": "ratings", "outcome": "numeric", "outcome_range": [1, 5],
         "arms": [{"name": n} for n in ("control", "x0.5-all", "clamp0-prompt")]},
    ]})
    reports = build_report(path, config=config)
    fig = figure(reports)
    texts = texts_of(fig)
    width, height = fig.canvas.get_width_height()
    for text, box in texts:
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height, text
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        apart = box_a[2] <= box_b[0] or box_b[2] <= box_a[0] or box_a[3] <= box_b[1] or box_b[3] <= box_a[1]
        assert apart, (a, b)
    labels = [t for t, _ in texts]
    assert "baseline-unsteered\n(control)\nn=60" in labels  # the control arm, named, with its count
    assert any(t.startswith("ircan-x4-prompt\nn=60\np=") for t in labels)
    assert "no outcomes attached yet" in labels
    rates_ax, ratings_ax = fig.axes[0], fig.axes[2]
    assert rates_ax.get_ylim()[0] == 0 and rates_ax.get_ylim()[1] <= 1.05
    low, high = ratings_ax.get_ylim()
    assert 0.9 <= low <= 1 and 5 <= high <= 5.1
    plt.close(fig)
