"""``kn-steer ab report``: read a log, compute per-arm statistics, print, plot and save them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from kn_steer.ab.config import ExperimentsConfig
from kn_steer.ab.log import Joined, read_log
from kn_steer.ab.stats import ExperimentStats, experiment_stats
from kn_steer.errors import KnSteerError
from kn_steer.fileio import atomic_savefig, atomic_write_json


def build_report(
    log_path: str | Path, experiment: str | None = None, config: ExperimentsConfig | None = None,
    control: str | None = None, confidence: float = 0.95,
) -> list[ExperimentStats]:
    """Statistics per experiment found in the log (or only ``experiment``)."""
    if not 0 < confidence < 1:
        raise KnSteerError(f"confidence must be between 0 and 1, got {confidence}")
    contents = read_log(log_path)
    groups: dict[str, list[Joined]] = {}
    for row in contents.requests.values():
        groups.setdefault(row.record.experiment, []).append(row)
    if experiment is not None:
        if experiment not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise KnSteerError(f"{log_path}: no requests of experiment {experiment!r} (found: {known})")
        groups = {experiment: groups[experiment]}
    if not groups:
        raise KnSteerError(f"{log_path}: no experiment requests logged yet")
    reports = []
    for name, rows in groups.items():
        order, ctrl = None, control
        if config is not None and any(e.name == name for e in config.experiments):
            exp = config.get(name)
            order = [a.name for a in exp.arms]
            ctrl = ctrl or exp.control_arm
        if ctrl is not None and ctrl not in {r.record.arm for r in rows} | set(order or ()):
            raise KnSteerError(f"control arm {ctrl!r} has no requests in experiment {name!r}")
        reports.append(experiment_stats(name, rows, order, ctrl, confidence))
    return reports


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.0e}" if p < 1e-3 else f"{p:.3f}"


def render(reports: Sequence[ExperimentStats]) -> None:
    """Print one compact table per experiment with rich (fits an 80-column terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for rep in reports:
        label = {"binary": "rate", "numeric": "mean", "none": "outcome"}[rep.kind]
        errors = sum(s.errors for s in rep.arms)
        table = Table(title=f"{rep.experiment}: {rep.kind} outcomes{' (paired by unit)' if rep.paired else ''}, "
                            f"{rep.confidence:.0%} intervals, "
                            f"control = {rep.control} (*), {errors} failed requests",
                      box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for col in ("arm", "n", "outc.", label, "interval", "diff", "test", "p", "Holm"):
            table.add_column(col, justify="left" if col in ("arm", "test") else "right", no_wrap=True)
        for s in rep.arms:
            v, c = s.value, s.vs_control
            table.add_row(
                s.arm + (" *" if s.is_control else ""), str(s.requests), str(s.outcomes),
                _fmt(v.estimate if v else None), f"{_fmt(v.low)}-{_fmt(v.high)}" if v else "-",
                _fmt(c.difference if c else None), c.test if c else "-",
                _fmt_p(c.p_value if c else None), _fmt_p(c.p_holm if c else None),
            )
        console.print(table)


def save_json(reports: Sequence[ExperimentStats], path: str | Path) -> Path:
    def clean(obj: Any) -> Any:  # JSON has no NaN
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return atomic_write_json(path, {"experiments": [clean(r.to_dict()) for r in reports]})


def plot(reports: Sequence[ExperimentStats], path: str | Path) -> Path:
    """One row per experiment: outcome per arm with its interval (p-value vs control above each
    bar) and requests per arm. Written through a temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 3.8 * len(reports)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for (ax_out, ax_n), rep in zip(axes, reports):
        names = [s.arm for s in rep.arms]
        colors = ["#7f7f7f" if s.is_control else "#1f77b4" for s in rep.arms]
        if rep.kind == "none":
            ax_out.text(0.5, 0.5, "no outcomes attached yet", ha="center", va="center", transform=ax_out.transAxes)
        else:
            est = [s.value.estimate if s.value else math.nan for s in rep.arms]
            low = [e - s.value.low if s.value and not math.isnan(s.value.low) else 0 for e, s in zip(est, rep.arms)]
            high = [s.value.high - e if s.value and not math.isnan(s.value.high) else 0 for e, s in zip(est, rep.arms)]
            ax_out.bar(names, est, yerr=[low, high], capsize=6, color=colors)
            for i, s in enumerate(rep.arms):
                note = f"n={s.outcomes}"
                if s.vs_control is not None:
                    note += f"\np={_fmt_p(s.vs_control.p_value)}"
                top = est[i] + high[i] if not math.isnan(est[i]) else 0
                ax_out.annotate(note, (i, top), ha="center", va="bottom", fontsize=8,
                                xytext=(0, 3), textcoords="offset points")
            ax_out.set_ylabel("success rate" if rep.kind == "binary" else "mean outcome")
            if rep.kind == "binary":
                ax_out.set_ylim(0, 1.15)
        ax_out.set_title(f"{rep.experiment}: outcome by arm ({rep.confidence:.0%} CI; grey = control)")
        ax_n.bar(names, [s.requests for s in rep.arms], color=colors)
        ax_n.bar(names, [s.errors for s in rep.arms], color="#d62728", label="errors")
        ax_n.set_title("requests per arm")
        ax_n.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return atomic_savefig(fig, path)
