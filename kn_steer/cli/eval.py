"""``kn-steer eval``: score MemoTrap / COSE_KRE under a neuron set or spec, through either backend."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kn_steer.data import FORMATS
from kn_steer.errors import KnSteerError


def eval_command(
    data: Path = typer.Option(..., "--data", help="Data file (MemoTrap .jsonl or COSE_KRE .json/.jsonl)."),
    format: str = typer.Option(..., "--format", help=f"Data format: {' | '.join(FORMATS)}."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Apply this neuron set with its default operation."),
    spec: Optional[str] = typer.Option(None, "--spec", help="A kn_steer spec as JSON, or @FILE holding it."),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers reference) or vllm (serving path)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Model name or checkpoint folder."),
    sets_dir: Optional[Path] = typer.Option(None, "--sets-dir", help="Neuron-set folder (default: shipped sets)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N items."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Items per forward (hf backend)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write summary and per-item scores as JSON."),
) -> None:
    """Score each item's choices by total log-probability; report accuracy and trap rate."""
    from kn_steer.eval.api import evaluate
    from kn_steer.fileio import atomic_write_json

    if format not in FORMATS:
        raise KnSteerError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if backend not in ("hf", "vllm"):
        raise KnSteerError(f"--backend must be 'hf' or 'vllm', got {backend!r}")
    result = evaluate(data, format, spec=spec, set_name=set_name, model=model, backend=backend,  # type: ignore[arg-type]
                      limit=limit, sets_dir=sets_dir, batch_size=batch_size, progress=True)
    s = result.summary
    steering = set_name or (spec if spec else "none")
    typer.echo(f"{result.format} {result.data} ({s['n']} items, backend {result.backend}, steering {steering})")
    typer.echo(f"accuracy   {s['accuracy']:.4f}")
    typer.echo(f"trap rate  {s['trap_rate']:.4f}")
    if out is not None:
        atomic_write_json(out, result.to_json())
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
