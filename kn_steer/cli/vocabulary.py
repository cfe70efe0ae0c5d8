"""``kn-steer map-vocab`` and ``kn-steer find-concept``: neurons read through the LM head
(:mod:`kn_steer.localize.vocabulary`). A concept's set is written by ``kn-steer localize concept``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import DEFAULT_MODEL


def map_vocab_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model name or checkpoint folder."),
    direction: str = typer.Option("write", "--direction", help="write (what a neuron promotes) or read."),
    k: int = typer.Option(10, "--top", min=1, help="Top (and bottom) tokens per neuron."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers (default: all)."),
    out: Path = typer.Option(..., "--out", help="JSONL file: one line per neuron."),
) -> None:
    """Map every neuron of the model to the tokens its direction promotes and suppresses through the
    final norm and the LM head (direct effect), and say how long it took."""
    from kn_steer.fileio import atomic_write_text
    from kn_steer.localize.vocabulary import map_neurons
    from kn_steer.models import load_hf_model, resolve_model

    try:
        chosen = None if layers is None else [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise KnSteerError(f"--layers must be comma-separated layer numbers, got {layers!r}") from None
    ref = resolve_model(model)
    hf, tokenizer = load_hf_model(ref)
    count = hf.config.num_hidden_layers
    if chosen is not None and any(not 0 <= layer < count for layer in chosen):
        raise KnSteerError(f"--layers: {ref.name} has layers 0..{count - 1}, got {layers}")
    mapped = map_neurons(hf, direction, k, layers=chosen, progress=True)
    import json

    lines = [json.dumps(row, ensure_ascii=False) for row in mapped.rows(tokenizer)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    typer.echo(f"mapped {len(lines)} neurons of {ref.name} ({direction} directions) in {mapped.seconds:.1f} s; "
               f"wrote {out}")


def find_concept_command(
    word: str = typer.Argument(..., help="A word the tokenizer keeps whole (e.g. dog)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model name or checkpoint folder."),
    direction: str = typer.Option("write", "--direction", help="write (promotes the word) or read."),
    top: int = typer.Option(10, "--top", min=1, help="Neurons listed."),
    max_rank: int = typer.Option(10, "--max-rank", min=1, help="Keep neurons with the word among their first N tokens."),
) -> None:
    """The neurons whose direction most singles out WORD among all tokens (z-score of its logit)."""
    from rich.console import Console
    from rich.table import Table

    from kn_steer.localize.vocabulary import find_concept, logits_of
    from kn_steer.models import load_hf_model, resolve_model

    ref = resolve_model(model)
    hf, tokenizer = load_hf_model(ref)
    found = find_concept(hf, tokenizer, word, direction, top, max_rank)
    logits = logits_of(hf, [(n.layer, n.index) for n in found], direction)
    table = Table(title=f"neurons of {word!r} on {ref.name} ({direction} directions through the LM head)")
    for col in ("layer", "index", "z", "token", "rank", "top tokens"):
        table.add_column(col, justify="left" if col == "top tokens" else "right")
    for n, row in zip(found, logits):
        tops = " ".join(repr(tokenizer.decode([int(t)])) for t in row.topk(6).indices)
        table.add_row(str(n.layer), str(n.index), f"{n.z:.1f}", repr(tokenizer.decode([n.token_id])), str(n.rank), tops)
    Console(width=150).print(table)
    typer.echo(f"as a neuron-set file: kn-steer localize concept --word {shlex.quote(word)} --model {model} "
               f"--direction {direction} --top {top} --max-rank {max_rank} --out neuron_sets/NAME.json")


def register(app: typer.Typer) -> None:
    app.command("map-vocab")(map_vocab_command)
    app.command("find-concept")(find_concept_command)
