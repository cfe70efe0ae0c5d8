"""Relation heads beside relation neurons on PARAREL (#17 items 3-4) with a real model (default
SmolLM2-135M-Instruct): a thin driver of ``kn_steer.eval.protocols.relation_heads`` (each evaluated
relation's top k heads by the ``relation-heads`` method zeroed, against random heads; beside its top
k x head_dim ``relation`` neurons zeroed, against matched random neurons; accuracy on the relation's
held-out known prompts and on the other relations').

    python benchmarks/repro_relation_heads.py
    python benchmarks/repro_relation_heads.py --model gemma3-270m --out repro-results/gemma3-270m/relation_heads.json

Results go to repro-results/relation-heads.json (+ .png) unless --out says otherwise; a published
result is only replaced with --force. Head scores and every scored condition are cached.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, log, output_path, publish, setup_threads

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.relation_heads import RelationHeadsConfig, protocol
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model

CONDITIONS = [("heads_set", "top heads"), ("heads_matched", "matched random heads"),
              ("heads_uniform", "uniform random heads"), ("neurons_set", "top relation neurons"),
              ("neurons_matched", "matched random neurons")]


def conditions(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The conditions this run measured (the random-head controls are a choice)."""
    first = next(iter(result["summary"].values()), {})
    return [(name, title) for name, title in CONDITIONS if name in first]


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    shape = result["shape"]
    console.print(f"{result['model']}: {shape['layers']} layers x {shape['heads']} heads of {shape['head_dim']}; "
                  f"evaluated relations (known held-out prompts): {result['known_prompts']}")
    table = Table(title="Accuracy on held-out known prompts (1.00 unsteered), mean over relations: own / others")
    table.add_column("k heads (= units)")
    for _, title in conditions(result):
        table.add_column(title, justify="right")
    table.add_column("p own: heads vs matched / neurons vs matched / heads vs neurons", justify="right")
    for k, e in result["summary"].items():
        units = k if not result["rows"] else next(r["units"] for r in result["rows"] if str(r["k"]) == k)
        cells = [f"{e[name]['own']:.2f} / {e[name]['others']:.2f}" for name, _ in conditions(result)]
        ps = [e.get("p_own_heads_set_vs_heads_matched"), e.get("p_own_neurons_set_vs_neurons_matched"),
              e.get("p_own_heads_set_vs_neurons_set")]
        table.add_row(f"{k} ({units})", *cells, " / ".join("-" if p is None else f"{p:.2g}" for p in ps))
    console.print(table)
    for row in result["rows"]:
        console.print(f"  {row['relation']} k={row['k']}: heads {row['heads']} own {row['heads_set']['own']:.2f} "
                      f"(random {row.get('heads_matched', row.get('heads_uniform', {})).get('own', float('nan')):.2f}); neurons own {row['neurons_set']['own']:.2f} "
                      f"(matched {row['neurons_matched']['own']:.2f})")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(result["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    colors = ["tab:red", "tab:cyan", "silver", "tab:purple", "plum"]
    shown = conditions(result)
    width = 0.8 / len(shown)
    for ax, side in zip(axes, ("own", "others")):
        for c, ((name, title), color) in enumerate(zip(shown, colors)):
            values = [result["summary"][k][name][side] for k in ks]
            ax.bar([i + c * width for i in range(len(ks))], values, width, color=color, label=title)
        ax.set_xticks([i + 2 * width for i in range(len(ks))], [f"k={k} heads" for k in ks])
        ax.set_title("the relation's own held-out prompts" if side == "own" else "the other relations' prompts")
        ax.axhline(1.0, color="black", lw=0.8)
    axes[0].set_ylabel("accuracy (1.00 unsteered)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Relation heads vs relation neurons (same units zeroed) on {result['model']}")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="PARAREL folder (default ../shared/data/pararel)")
    p.add_argument("--head-counts", nargs="+", type=int, default=[1, 3, 5])
    p.add_argument("--max-relations", type=int, default=6)
    p.add_argument("--max-prompts", type=int, default=48)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--test-facts", type=int, default=150)
    p.add_argument("--test-prompts", type=int, default=2)
    p.add_argument("--min-known", type=int, default=10)
    p.add_argument("--controls", default="matched,uniform", help="random-head controls")
    p.add_argument("--head-layers", nargs="*", type=int, default=None, help="search these layers' heads only")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "pararel"
    config = RelationHeadsConfig(head_counts=args.head_counts, max_relations=args.max_relations,
                                 max_prompts=args.max_prompts, seeds=args.seeds, test_facts=args.test_facts,
                                 test_prompts=args.test_prompts, min_known=args.min_known, head_layers=args.head_layers,
                                 controls=[c for c in args.controls.split(",") if c])
    out = output_path(args, "relation-heads")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    log(f"relation heads on {folder} with {ref.name}")
    result = protocol(model, tok, ref, folder, config, default_cache("relation")).run()
    return publish(result, out, "repro_relation_heads.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
