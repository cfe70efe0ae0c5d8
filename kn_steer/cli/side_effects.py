"""``kn-steer eval --side-effects SET``: the side-effect table, the dose sweep and its PNG.

With ``--server URL`` every measure is read from that running server (:mod:`kn_steer.eval.server_backend`)
instead of the transformers reference. Defaults read ``../shared/data`` when it exists: perplexity on UD EWT paragraphs, MemoTrap and
COSE_KRE test items (first 200), PARAREL recall; any of them can be pointed elsewhere or left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kn_steer.data import shared_data_dir
from kn_steer.errors import KnSteerError
from kn_steer.eval.api import Evaluator, HFEvaluator, make_spec, single_intervention
from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols import side_effects
from kn_steer.fileio import atomic_savefig, atomic_write_json

DEFAULT_TEXT = "english/ewt_paragraphs.jsonl"
DEFAULT_TASKS = ("memotrap/test.jsonl", "kre/cose_test.json")


def default_inputs() -> dict[str, Any]:
    """The shared data files that exist here (none on a machine without ``../shared/data``)."""
    root = shared_data_dir()
    text = root / DEFAULT_TEXT
    return {"text": text if text.is_file() else None,
            "tasks": [root / t for t in DEFAULT_TASKS if (root / t).is_file()],
            "pararel": root / "pararel" if (root / "pararel").is_dir() else None}


def table_of(result: dict[str, Any]) -> Table:
    what = result["set"] or "spec"
    where = f" on {result['server']}" if result.get("server") else ""
    table = Table(title=f"Side effects of {what}{where} ({result['neurons']} neurons, {result['dose']['op']} "
                        f"{result['dose'].get('factor') if result['dose']['op'] == 'scale' else result['dose'].get('value')})")
    kinds = [k for k in ("matched", "uniform") if result["table"] and k in result["table"][0]]
    for col in ["measure", "unsteered", "set", "p (set vs unsteered)"] + [f"{k} random (mean ± sd)" for k in kinds]:
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in result["table"]:
        fmt = "{:.2f}" if row["kind"] == "perplexity" else "{:.3f}"
        cells = [row["measure"], fmt.format(row["unsteered"]), fmt.format(row["set"]), f"{row['p_set_vs_unsteered']:.3g}"]
        cells += [f"{fmt.format(row[k]['mean'])} ± {fmt.format(row[k]['sd'])}" for k in kinds]
        table.add_row(*cells)
    return table


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    names = [row["measure"] for row in result["table"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    doses = [p["dose"] for p in sweep]
    for ax, name in zip(axes[0], names):
        ax.plot(doses, [p[name]["set"] for p in sweep], "o-", color="#c33", label=result["set"] or "set")
        if sweep and sweep[0][name]["matched"] is not None:
            mean = [p[name]["matched"]["mean"] for p in sweep]
            sd = [p[name]["matched"]["sd"] for p in sweep]
            ax.errorbar(doses, mean, yerr=sd, fmt="s--", color="#39c", capsize=3, label="matched random")
        ax.axhline(result["unsteered"][name], color="#888", lw=1, label="unsteered")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("factor" if result["dose"]["op"] == "scale" else "clamp value")
        if name.startswith("perplexity"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Dose sweep: {result['set'] or 'spec'} on {result['model']}", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)


def report(*, set_name: str | None, spec: str | None, model: str | None, sets_dir: Path | None,
           text: Path | None, tasks: list[Path], pararel: Path | None, no_defaults: bool,
           texts: int, task_limit: int, doses: str | None, controls: list[str], seeds: int,
           sweep_seeds: int, batch_size: int, out: Path | None, server: str | None = None,
           api_key: str | None = None) -> dict[str, Any]:
    defaults = {"text": None, "tasks": [], "pararel": None} if no_defaults else default_inputs()
    try:
        given = None if doses is None else [float(d) for d in doses.split(",") if d.strip()]
    except ValueError as exc:
        raise KnSteerError(f"--doses must be comma-separated numbers, got {doses!r}") from exc
    if server is not None:
        from kn_steer.eval.server_backend import ServerEvaluator

        if sets_dir is not None:
            raise KnSteerError("--sets is the server's to choose: with --server, SET is one the server serves")
        ev: Evaluator = ServerEvaluator(server, api_key=api_key, model=model)
    else:
        ev = HFEvaluator(model or "smollm2-135m", sets_dir=sets_dir, batch_size=batch_size,
                         cache=default_cache("side_effects"))
    steering = make_spec(spec, set_name)
    if steering is None:
        raise KnSteerError("--side-effects needs a set (SET) or a --spec with one intervention")
    uses_sets = any(iv.set is not None for iv in steering.interventions)
    _, dose = single_intervention(steering, ev.sets if uses_sets else {})
    amounts = side_effects.default_doses(dose["op"]) if given is None else given
    config = side_effects.SideEffectsConfig(
        text=text or defaults["text"], texts=texts, tasks=tasks or defaults["tasks"], task_limit=task_limit,
        pararel=pararel or defaults["pararel"], controls=controls, seeds=seeds, doses=amounts,
        sweep_seeds=sweep_seeds, batch_size=batch_size)
    if config.text is None and not config.tasks and config.pararel is None:
        raise KnSteerError("no measure: give --text, --task or --pararel (../shared/data is not here)")
    result = side_effects.run(ev, None if set_name else steering, config, set_name=set_name)
    Console(width=170).print(table_of(result))
    if out is not None:
        atomic_write_json(out, result)
        if result["sweep"]:
            plot_sweep(result, out.with_suffix(".png"))
        print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if result["sweep"] else ""))
    return result
