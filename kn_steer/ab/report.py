"""``kn-steer ab report``: read a log, compute per-arm statistics, print, plot and save them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from kn_steer.ab.config import ExperimentsConfig
from kn_steer.ab.log import Joined, read_logs
from kn_steer.ab.stats import ArmStats, ExperimentStats, experiment_stats
from kn_steer.errors import KnSteerError
from kn_steer.fileio import atomic_savefig, atomic_write_json


def build_report(
    log_path: str | Path | Sequence[str | Path], experiment: str | None = None,
    config: ExperimentsConfig | None = None, control: str | None = None, confidence: float = 0.95,
) -> list[ExperimentStats]:
    """Statistics per experiment found in the log, or in the logs of several replicas read as one
    (or only ``experiment``)."""
    if not 0 < confidence < 1:
        raise KnSteerError(f"confidence must be between 0 and 1, got {confidence}")
    paths = [log_path] if isinstance(log_path, (str, Path)) else list(log_path)
    if not paths:
        raise KnSteerError("no A/B log given")
    contents = read_logs(paths)
    log_path = ", ".join(str(p) for p in paths)
    groups: dict[str, list[Joined]] = {}
    reused: dict[str, int] = {}
    for key, row in contents.requests.items():
        groups.setdefault(row.record.experiment, []).append(row)
        if key != row.record.request_id:
            reused[row.record.experiment] = reused.get(row.record.experiment, 0) + 1
    if experiment is not None:
        if experiment not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise KnSteerError(f"{log_path}: no requests of experiment {experiment!r} (found: {known})")
        groups = {experiment: groups[experiment]}
    if not groups:
        raise KnSteerError(f"{log_path}: no experiment requests logged yet")
    reports = []
    for name, rows in groups.items():
        order, ctrl, kind, bounds = None, control, None, None
        if config is not None and any(e.name == name for e in config.experiments):
            exp = config.get(name)
            order = [a.name for a in exp.arms]
            ctrl = ctrl or exp.control_arm
            kind, bounds = exp.outcome, exp.outcome_range
        if ctrl is not None and ctrl not in {r.record.arm for r in rows} | set(order or ()):
            raise KnSteerError(f"control arm {ctrl!r} has no requests in experiment {name!r}")
        stats = experiment_stats(name, rows, order, ctrl, confidence, kind=kind, outcome_range=bounds)
        stats.reused_ids = reused.get(name, 0)
        reports.append(stats)
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
        table = Table(title=f"{rep.experiment}: {rep.kind} outcomes"
                            f"{f' ({rep.kind_source})' if rep.kind != 'none' else ''}"
                            f"{' paired by unit' if rep.paired else ''}, "
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
        if rep.ignored_outcomes:
            console.print(f"  {rep.ignored_outcomes} outcome(s) left out: not {rep.kind} "
                          f"({'declared' if rep.kind_source == 'declared' else 'the type of the first outcome'})"
                          + (f" or outside {list(rep.outcome_range)}" if rep.outcome_range else ""))
        if rep.reused_ids:
            console.print(f"  {rep.reused_ids} request(s) logged under an id an earlier request had "
                          "(reused X-Request-Id): their outcomes could not be attached")


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


def _arm_label(s: ArmStats) -> str:
    """Tick label under an arm's bar: its name, outcomes and p-value (never near the title)."""
    label = s.arm + ("\n(control)" if s.is_control and s.arm != "control" else "") + f"\nn={s.outcomes}"
    if s.vs_control is not None:
        label += f"\np={_fmt_p(s.vs_control.p_value)}"
    return label


def figure(reports: Sequence[ExperimentStats]) -> Any:
    """One row per experiment: outcome per arm with its interval, and requests per arm.

    Rates are bars from 0 to 1; numeric means are points (a bar's length would mean nothing on
    a scale such as 1-5), inside the declared range when there is one. Counts and p-values go in
    the tick labels under the arms, where they cannot collide with bars, error bars or title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # room per arm for its widest tick label (about 0.075 in per character at 8 pt)
    slots = max((len(r.arms) * max(1.0, 0.075 * max(len(s.arm) + 2 for s in r.arms)) for r in reports), default=0)
    fig, axes = plt.subplots(len(reports), 2, figsize=(max(11.0, (slots + 0.8) * 5 / 3), 4.2 * len(reports)),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for (ax_out, ax_n), rep in zip(axes, reports):
        names = [s.arm for s in rep.arms]
        positions = list(range(len(names)))
        colors = ["#7f7f7f" if s.is_control else "#1f77b4" for s in rep.arms]
        if rep.kind == "none" or not any(s.outcomes for s in rep.arms):
            ax_out.text(0.5, 0.5, "no outcomes attached yet", ha="center", va="center", transform=ax_out.transAxes)
            ax_out.set_yticks([])
        else:
            est = [s.value.estimate if s.value else math.nan for s in rep.arms]
            low = [e - s.value.low if s.value and not math.isnan(s.value.low) else 0 for e, s in zip(est, rep.arms)]
            high = [s.value.high - e if s.value and not math.isnan(s.value.high) else 0 for e, s in zip(est, rep.arms)]
            if rep.kind == "binary":
                ax_out.bar(positions, est, yerr=[low, high], capsize=6, color=colors)
                ax_out.set_ylim(0, 1.02)
                ax_out.set_ylabel("success rate")
            else:
                for x, e, lo, hi, color in zip(positions, est, low, high, colors):
                    ax_out.errorbar([x], [e], yerr=[[lo], [hi]], fmt="o", capsize=6, color=color, markersize=8)
                ax_out.set_xlim(-0.6, len(names) - 0.4)
                ax_out.set_ylabel("mean outcome")
                if rep.outcome_range is not None:
                    span = rep.outcome_range[1] - rep.outcome_range[0]
                    ax_out.set_ylim(rep.outcome_range[0] - 0.02 * span, rep.outcome_range[1] + 0.02 * span)
            ax_out.grid(axis="y", alpha=0.3)
        ax_out.set_xticks(positions, [_arm_label(s) for s in rep.arms], fontsize=8)
        ax_out.set_title(f"{rep.experiment}: {rep.kind} outcome by arm\n"
                         f"({rep.confidence:.0%} CI, p vs control; grey = control)", fontsize=10)
        # horizontal bars: arm names stacked down the side never run into each other
        ax_n.barh(positions, [s.requests for s in rep.arms], color=colors)
        ax_n.barh(positions, [s.errors for s in rep.arms], color="#d62728")
        ax_n.set_yticks(positions, names, fontsize=8)
        ax_n.invert_yaxis()
        ax_n.set_xlabel("requests")
        ax_n.set_title("requests per arm (red: failed)", fontsize=10)
    fig.tight_layout()
    return fig


def plot(reports: Sequence[ExperimentStats], path: str | Path) -> Path:
    """:func:`figure` as a PNG, written through a temporary file, then renamed."""
    return atomic_savefig(figure(reports), Path(path))
