"""Analysis commands: neuron statistics that report, and write no set.

``kn-steer parallel-input``: does parallel multilingual input inhibit neurons (PiM)?
(:mod:`kn_steer.eval.protocols.parallel_input`)."""

from __future__ import annotations

from pathlib import Path

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import DEFAULT_MODEL


def parallel_input_command(
    data: Path = typer.Option(..., "--data", help="Parallel folder (one LANG.jsonl per language), e.g. ../shared/data/pud."),
    out: Path = typer.Option(..., "--out", help="Result JSON (a PNG is written beside it)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model name or checkpoint folder."),
    target: str = typer.Option("en", "--target", help="The language of the measured sentence."),
    languages: str = typer.Option("de,fr,es,ru,zh,ja,ar,hi", "--languages", help="Context languages, in the order added."),
    ks: str = typer.Option("1,2,4,8", "--ks", help="Numbers of context languages compared with none."),
    sentences: int = typer.Option(60, "--sentences", min=2, help="Sentences measured (the folder's first N)."),
    max_tokens: int = typer.Option(48, "--max-tokens", min=1, help="Tokens kept per sentence."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
) -> None:
    """Firing on the same target sentence after nothing, after its translations (parallel) and after
    unrelated sentences in the same languages; per layer, with paired tests."""
    from rich.console import Console
    from rich.table import Table

    from kn_steer.data.parallel import ParallelText, load_parallel
    from kn_steer.eval.protocols import parallel_input
    from kn_steer.fileio import atomic_write_json
    from kn_steer.models import load_hf_model, resolve_model

    try:
        counts = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise KnSteerError(f"--ks must be comma-separated integers, got {ks!r}") from None
    context = [c.strip() for c in languages.split(",") if c.strip()]
    if not counts or min(counts) < 1 or max(counts) > len(context):
        raise KnSteerError(f"--ks must be between 1 and the {len(context)} --languages, got {ks!r}")
    if target in context:
        raise KnSteerError(f"--target {target} is also a context language")
    if out.suffix != ".json":
        raise KnSteerError(f"--out {out} must be a .json file")
    text = load_parallel(data, [target, *context])
    text = ParallelText(text.ids[:sentences], {k: v[:sentences] for k, v in text.texts.items()})
    ref = resolve_model(model)
    hf, tokenizer = load_hf_model(ref)
    result = parallel_input.run(hf, tokenizer, text, target, context, counts, max_tokens, batch_size)
    result.update({"model": ref.name, "fingerprint": ref.fingerprint, "data": str(data)})
    atomic_write_json(out, result)
    parallel_input.plot(result, f"{ref.name}: firing on the {target} sentence", out.with_suffix(".png"))
    table = Table(title=f"{ref.name}: firing on the same {target} sentence ({len(text.ids)} sentences)")
    for name in ("context", "token firing share", "sentence firing share", "p vs monolingual", "p vs unrelated"):
        table.add_column(name)
    for label, row in result["conditions"].items():
        table.add_row(label, f"{row['token_rate']:.4f}", f"{row['sentence_rate']:.4f}",
                      f"{row['p_vs_monolingual']:.2g}" if "p_vs_monolingual" in row else "",
                      f"{row['p_vs_unrelated']:.2g}" if "p_vs_unrelated" in row else "")
    Console().print(table)
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    app.command("parallel-input")(parallel_input_command)
