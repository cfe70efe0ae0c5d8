"""``kn-steer eval``: score MemoTrap / COSE_KRE under a neuron set or spec, beside the unsteered
baseline, through either backend; optionally against random controls of the same dose.
``--side-effects SET`` reports instead what the set does beyond its purpose (:mod:`kn_steer.cli.side_effects`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from kn_steer.data import FORMATS, detect_format
from kn_steer.errors import KnSteerError
from kn_steer.eval.api import evaluate
from kn_steer.eval.controls import CONTROL_KINDS
from kn_steer.fileio import atomic_write_json


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(result: dict[str, Any]) -> Table:
    steered = result["spec"] is not None
    table = Table(title=f"{result['format']} {result['data']} ({result['n']} items, backend {result['backend']})")
    for col in ["rule", "unsteered acc / trap"] + (["steered acc / trap", "McNemar p (won/lost)"] if steered else []):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for kind in result.get("controls", {}):
        table.add_column(f"{kind} random acc (mean ± sd)", justify="right")
    base = result["unsteered"]["rules"] if steered else result["rules"]
    for rule in base:
        row = [rule, f"{_fmt(base[rule]['accuracy'])} / {_fmt(base[rule]['trap_rate'])}"]
        if steered:
            mine, test = result["rules"][rule], result["mcnemar_vs_unsteered"][rule]
            row += [f"{_fmt(mine['accuracy'])} / {_fmt(mine['trap_rate'])}",
                    f"{test['p_value']:.3g} ({test['items_won']}/{test['items_lost']})"]
        for kind, by_rule in result.get("controls", {}).items():
            acc = by_rule[rule]["accuracy"]
            row.append(f"{acc['mean']:.3f} ± {acc['sd']:.3f}")
        table.add_row(*row)
    return table


def eval_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Data file (MemoTrap or COSE_KRE schema; any file name)."),
    format: Optional[str] = typer.Option(None, "--format", help=f"{' | '.join(FORMATS)} (default: from the file's fields)."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Apply this neuron set with its default operation."),
    spec: Optional[str] = typer.Option(None, "--spec", help="A kn_steer spec as JSON, or @FILE holding it."),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers reference) or vllm (serving path); "
                                "--server implies server."),
    server: Optional[str] = typer.Option(
        None, "--server", metavar="URL", help="Read every score from this running kn-steer server (http://host:port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KN_STEER_API_KEY",
                                          help="The server's --api-key, if it has one."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or checkpoint folder "
                                        "(default smollm2-135m; with --server, the server's model)."),
    sets_dir: Optional[Path] = typer.Option(
        None, "--sets", help="Neuron-set folder (default: $KN_STEER_NEURON_SETS or neuron_sets/)."),
    old_sets_dir: Optional[Path] = typer.Option(None, "--sets-dir", hidden=True, help="Deprecated spelling of --sets."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N items."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per forward (hf backend)."),
    controls: list[str] = typer.Option(
        [], "--controls", help=f"Random controls of the same size and dose: {' | '.join(CONTROL_KINDS)} (repeatable)."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Seeds per random control."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write summaries, paired tests and per-item scores as JSON."),
    side_effects_set: Optional[str] = typer.Option(
        None, "--side-effects", metavar="SET",
        help="Report what SET does beyond its purpose: perplexity, task accuracies and PARAREL recall beside "
             "random neurons of the same size and dose, and a dose sweep (PNG beside --out)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Side effects: JSONL text file for perplexity "
                                        "(default ../shared/data/english/ewt_paragraphs.jsonl)."),
    tasks: list[Path] = typer.Option([], "--task", help="Side effects: MemoTrap/COSE_KRE file (repeatable; "
                                     "default MemoTrap and COSE_KRE test)."),
    pararel: Optional[Path] = typer.Option(None, "--pararel", help="Side effects: PARAREL folder for recall."),
    no_default_data: bool = typer.Option(False, "--no-default-data", help="Side effects: only the files given."),
    texts: int = typer.Option(100, "--texts", min=1, help="Side effects: texts for perplexity."),
    task_limit: int = typer.Option(200, "--task-limit", min=1, help="Side effects: first items of each task."),
    doses: Optional[str] = typer.Option(None, "--doses", help="Side effects: sweep doses, e.g. 0,1,2,4,8 "
                                        "(factors for scale, values for clamp; empty string: no sweep)."),
    sweep_seeds: int = typer.Option(2, "--sweep-seeds", min=0, help="Side effects: matched controls per dose."),
) -> None:
    """Score each item's choices (total, length-normalized and calibrated log-probability); report
    accuracy and trap rate beside the unsteered baseline, with exact McNemar tests."""
    kinds = [k for item in controls for k in item.split(",") if k]
    if side_effects_set is not None:
        from kn_steer.cli.side_effects import report

        if data is not None or set_name is not None or spec is not None:
            raise KnSteerError("--side-effects SET takes the set itself; leave out --data, --set and --spec")
        if backend != "hf":
            raise KnSteerError("--side-effects runs on the hf backend or, with --server URL, on a server")
        report(set_name=side_effects_set, spec=None, model=model, sets_dir=sets_dir or old_sets_dir, text=text,
               tasks=tasks, pararel=pararel, no_defaults=no_default_data, texts=texts, task_limit=task_limit,
               doses=doses, controls=kinds or ["matched", "uniform"], seeds=seeds, sweep_seeds=sweep_seeds,
               batch_size=min(batch_size, 8), out=out, server=server, api_key=api_key)
        return
    if data is None:
        raise KnSteerError("give --data FILE (or --side-effects SET)")
    if old_sets_dir is not None:
        if sets_dir is not None:
            raise KnSteerError("give --sets only (--sets-dir is its deprecated spelling)")
        typer.secho("note: --sets-dir is deprecated; use --sets (as kn-steer serve does)", err=True, fg="yellow")
        sets_dir = old_sets_dir
    format = format or detect_format(data)
    if format not in FORMATS:
        raise KnSteerError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if server is not None:
        if backend not in ("hf", "server"):
            raise KnSteerError(f"--server reads scores from the server; leave out --backend {backend}")
        if sets_dir is not None:
            raise KnSteerError("--sets is the server's to choose: with --server, --set names one the server serves")
        backend = "server"
    if backend not in ("hf", "vllm", "server"):
        raise KnSteerError(f"--backend must be 'hf' or 'vllm', got {backend!r}")
    if backend == "server" and server is None:
        raise KnSteerError("--backend server needs --server URL")
    result = evaluate(data, format, spec=spec, set_name=set_name, model=model, backend=backend,  # type: ignore[arg-type]
                      limit=limit, sets_dir=sets_dir, batch_size=batch_size, progress=True,
                      controls=kinds, seeds=seeds, server=server, api_key=api_key)
    payload = result.to_json()
    typer.echo(f"steering: {set_name or spec or 'none'}")
    Console(width=160).print(_table(payload))
    if out is not None:
        atomic_write_json(out, payload)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
