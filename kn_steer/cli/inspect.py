"""``kn-steer inspect SET.json``: a neuron set's metadata, layers, top neurons and their tokens."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import DEFAULT_MODEL


def _tokens_text(tokens) -> "Text":  # noqa: F821 - rich is imported lazily
    from rich.text import Text

    # repr() shows leading spaces and newlines; Text (not markup) keeps '[' in tokens literal.
    return Text(" ".join(repr(t.text) for t in tokens))


def _print_report(ns, reports, counts_only: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    meta = Table(title=f"neuron set {ns.name}", show_header=False)
    meta.add_column("field", style="bold")
    meta.add_column("value")
    op = ns.operation
    rows = [
        ("description", ns.description or "-"),
        ("model", f"{ns.model.name} ({ns.model.architecture}, {ns.model.num_layers} layers x "
                  f"{ns.model.intermediate_size}) {ns.model.fingerprint}"),
        ("method", f"{ns.method.name} {json.dumps(ns.method.params, sort_keys=True)}"),
        ("operation", f"{op.op} " + (f"factor={op.factor}" if op.op == "scale" else f"value={op.value}")),
        ("units", f"{len(ns.neurons)} neurons, {len(ns.heads)} heads, {len(ns.directions)} directions in "
                  f"{len(ns.counts_per_layer())} layers"),
        ("data", f"{ns.provenance.data_file or '-'} ({ns.provenance.examples if ns.provenance.examples is not None else '-'} examples, "
                 f"sha256 {(ns.provenance.data_sha256 or '-')[:16]})"),
        ("created", f"{ns.provenance.created:%Y-%m-%d %H:%M UTC} by kn-steer {ns.provenance.kn_steer_version}"),
    ]
    if ns.metrics:
        rows.append(("metrics", json.dumps(ns.metrics, sort_keys=True)))
    for key, value in rows:
        meta.add_row(key, value)
    console.print(meta)

    per_layer = Table(title="neurons per layer")
    per_layer.add_column("layer", justify="right")
    per_layer.add_column("neurons", justify="right")
    per_layer.add_column("", no_wrap=True)
    counts = ns.counts_per_layer()
    widest = max(counts.values(), default=1)
    for layer, count in counts.items():
        per_layer.add_row(str(layer), str(count), "#" * max(1, round(30 * count / widest)))
    console.print(per_layer)
    if counts_only:
        return

    top = Table(title=f"top {len(reports)} neurons by score")
    for name, justify in (("layer", "right"), ("index", "right"), ("score", "right")):
        top.add_column(name, justify=justify)
    top.add_column("reads (up/fc row)")
    top.add_column("promotes (down column)")
    top.add_column("suppresses")
    for r in reports:
        top.add_row(str(r.layer), str(r.index), "-" if r.score is None else f"{r.score:.4g}",
                    _tokens_text(r.reads), _tokens_text(r.promotes), _tokens_text(r.suppresses))
    console.print(top)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        neuron_set: Path = typer.Argument(..., help="A neuron-set JSON file."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help="The model the set was found on (checked by fingerprint)."),
        top: int = typer.Option(10, "--top", help="How many top-scoring neurons to show."),
        tokens: int = typer.Option(5, "--tokens", help="Tokens per direction for each neuron."),
        plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of score by layer here (the top "
                                                          "neurons labelled, at most 20)."),
    ) -> None:
        """Print a set's metadata, counts per layer, and the tokens its top neurons read and write."""
        from kn_steer.models import load_hf_model
        from kn_steer.sets.format import NeuronSet
        from kn_steer.sets.inspect import (
            check_set_model,
            neuron_tokens,
            plot_distribution,
        )

        if top < 0 or tokens < 1:
            raise KnSteerError("--top must be >= 0 and --tokens >= 1")
        ns = NeuronSet.load(neuron_set)
        ref, _ = check_set_model(ns, model)
        reports = []
        if top > 0 and ns.neurons:
            hf_model, tokenizer = load_hf_model(ref)
            reports = neuron_tokens(hf_model, tokenizer, ns.top(top), k=tokens)
        _print_report(ns, reports, counts_only=top == 0)
        if plot is not None:
            written = plot_distribution(ns, plot, annotate=top)
            typer.echo(f"plot written to {written}")
