"""``kn-steer stats``: every neuron's firing rate, mean and maximum over a text corpus, per group,
through vLLM (default) or transformers hooks; written as an activation-stats file
(:mod:`kn_steer.activations.format`) with a per-layer picture beside it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import DEFAULT_MODEL


ROWS_SHOWN = 24  # table rows printed (the file has every group)


def stats_command_line(data: Path, out: Path, model: str, backend: str, texts: Optional[int], max_tokens: int,
                       threshold: float, positions: str, group_field: Optional[str], by: str = "text",
                       top_tokens: int = 100) -> str:
    """The shell command that redoes this run (recorded in the file's header)."""
    args = ["kn-steer", "stats", "--data", str(data), "--out", str(out), "--model", model, "--backend", backend,
            "--max-tokens", str(max_tokens), "--threshold", repr(threshold), "--positions", positions]
    if texts is not None:
        args += ["--texts", str(texts)]
    if group_field:
        args += ["--group-field", group_field]
    if by != "text":
        args += ["--by", by] + (["--top-tokens", str(top_tokens)] if by == "token" else [])
    return shlex.join(args)


def engine_groups(by: str, max_tokens: int, top_tokens: int) -> int:
    """Statistics groups the engine must keep for one run (and a few for its own labels)."""
    needed = {"text": 60, "position": max_tokens, "token": top_tokens + 1}[by]
    return max(64, needed + 4)


def plot(stats: Any, path: Path) -> None:
    """Per group, the share of (token, neuron) pairs firing in each layer, and the mean value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kn_steer.fileio import atomic_savefig

    rate, mean = np.nanmean(stats.fire_rate(), 2), np.nanmean(stats.mean(), 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if stats.header.by == "text":
        for g, name in enumerate(stats.header.groups[:12]):
            left.plot(rate[g], label=name)
            right.plot(mean[g], label=name)
        left.set(xlabel="layer", ylabel=f"share of (token, neuron) pairs > {stats.header.threshold:g}")
        right.set(xlabel="layer", ylabel="mean neuron value")
        left.legend(fontsize=7)
    else:  # one row per position or token id: layers across
        for axis, values, title in ((left, rate, f"share of neurons > {stats.header.threshold:g}"),
                                    (right, mean, "mean neuron value")):
            image = axis.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
            axis.set(xlabel="layer", ylabel=stats.header.by, title=title)
            fig.colorbar(image, ax=axis)
    fig.suptitle(f"{stats.header.model.name}: {stats.header.data_file} ({stats.header.positions} positions)")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def stats_command(
    data: Path = typer.Option(..., "--data", help="Text JSONL (a 'text' field per line), e.g. "
                              "../shared/data/english/ewt_paragraphs.jsonl."),
    out: Path = typer.Option(..., "--out", help="Statistics file (.npz); a PNG is written beside it."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model name or checkpoint folder."),
    backend: str = typer.Option("vllm", "--backend", help="vllm (the serving engine's read op) or hf "
                                "(transformers hooks, the reference)."),
    texts: Optional[int] = typer.Option(None, "--texts", min=1, help="Only the first N non-blank texts."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, max=32768, help="Tokens kept per text (the first N)."),
    threshold: float = typer.Option(0.0, "--threshold", help="A neuron fires where its value exceeds this."),
    positions: str = typer.Option("all", "--positions", help="all (every token, <bos> included) or last "
                                  "(each text's last token)."),
    group_field: Optional[str] = typer.Option(None, "--group-field", help="Count texts apart by this field "
                                              "(e.g. lang); default: one group."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Texts per forward (hf backend)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="vllm: no compiled graph (faster start)."),
    by: str = typer.Option("text", "--by", help="What a group is: text (texts, by --group-field), position "
                           "(each token position) or token (each token id; the --top-tokens most frequent)."),
    top_tokens: int = typer.Option(100, "--top-tokens", min=1, max=4095, help="--by token: ids kept apart; "
                                   "the rest count as 'other'."),
) -> None:
    """Run a corpus through the model and write every neuron's firing rate, mean and maximum."""
    from rich.console import Console
    from rich.table import Table

    from kn_steer.activations.run import corpus_stats
    from kn_steer.data.text import load_texts
    from kn_steer.models import resolve_model
    from kn_steer.sets.format import model_identity

    if backend not in ("vllm", "hf"):
        raise KnSteerError(f"--backend must be 'vllm' or 'hf', got {backend!r}")
    if positions not in ("all", "last"):
        raise KnSteerError(f"--positions must be 'all' or 'last', got {positions!r}")
    if by not in ("text", "position", "token"):
        raise KnSteerError(f"--by must be 'text', 'position' or 'token', got {by!r}")
    if by != "text" and group_field:
        raise KnSteerError(f"--by {by} counts tokens apart, not texts: leave out --group-field")
    if by == "position" and max_tokens > 4096:
        raise KnSteerError(f"--by position keeps at most 4096 positions: --max-tokens {max_tokens} is too large")
    if out.suffix != ".npz":
        raise KnSteerError(f"--out {out} must be a .npz file")
    if not np.isfinite(threshold):
        raise KnSteerError(f"--threshold must be a finite number, got {threshold}")
    if not data.is_file():
        raise KnSteerError(f"--data {data}: no such file")
    items = load_texts(data, texts, group_field)
    ref = resolve_model(model)
    command = stats_command_line(data, out, model, backend, texts, max_tokens, threshold, positions, group_field,
                                 by, top_tokens)
    common = dict(threshold=threshold, positions=positions, max_tokens=max_tokens, data_file=str(data),
                  group_field=group_field, command=command, by=by, top_tokens=top_tokens)
    if backend == "vllm":
        from kn_steer.activations.engine import ActivationEngine

        engine = ActivationEngine(model, threshold=threshold, max_model_len=max(256, max_tokens + 1),
                                  groups=engine_groups(by, max_tokens, top_tokens), enforce_eager=enforce_eager)
        try:
            stats = corpus_stats(items, engine.identity, engine=engine, **common)
        finally:
            engine.close()
    else:
        from kn_steer.models import load_hf_model

        hf, tokenizer = load_hf_model(ref)
        stats = corpus_stats(items, model_identity(ref, hf.config), model=hf, tokenizer=tokenizer,
                             batch_size=batch_size, **common)
    stats.save(out)
    plot(stats, out.with_suffix(".png"))
    rate, mean = stats.fire_rate(), stats.mean()
    table = Table(title=f"{ref.name}: {data} ({positions} positions, fires > {threshold:g}, backend {backend})")
    for column in ("group", "texts", "tokens", "firing share", "mean value", "never fire"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for g, name in enumerate(stats.header.groups[:ROWS_SHOWN]):
        table.add_row(name, str(stats.header.texts[g]), str(stats.header.tokens[g]), f"{np.nanmean(rate[g]):.4f}",
                      f"{np.nanmean(mean[g]):+.4f}", str(int((stats.fires[g] == 0).sum())))
    Console(width=140).print(table)
    if len(stats.header.groups) > ROWS_SHOWN:
        typer.echo(f"({len(stats.header.groups) - ROWS_SHOWN} more groups in the file)")
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    app.command("stats")(stats_command)
