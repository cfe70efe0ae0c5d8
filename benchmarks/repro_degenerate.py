"""Degenerate knowledge neurons (issue #18 item 1): a thin driver of
``kn_steer.eval.protocols.degenerate`` on the knowledge-neuron protocol's known PARAREL facts and
per-fact ``kn`` sets (the same defaults as ``repro_knowledge_neurons.py``, so its caches serve).

    python benchmarks/repro_degenerate.py                          # SmolLM2-135M
    python benchmarks/repro_degenerate.py --model gemma3-270m

Results go to repro-results/degenerate-<model>.json (+ .png) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro_common import add_common, add_fact_options, data_dir, log, output_path, publish, pyplot, setup_threads

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.degenerate import DegenerateConfig, DegenerateProtocol
from kn_steer.eval.protocols.knowledge import DEFAULT_RELATIONS
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    o = result["overall"]
    table = Table(title=f"{result['model']}: degenerate knowledge neurons over {o['facts']} facts with >= 2 neurons")
    table.add_column("measure")
    table.add_column("weight-structure split", justify="right")
    table.add_column("random split / matched random", justify="right")
    table.add_column("p", justify="right")
    table.add_row("facts whose whole set removes >= half of P", str(o.get("removed_by_whole_set")), "", "")
    table.add_row("degenerate facts (each group alone < half)", str(o.get("degenerate")),
                  f"{o.get('random_split_degenerate', 0) * o['facts']:.1f}", f"{o.get('p_structure_vs_random_split', 1):.2g}")
    if "complementarity" in o:
        table.add_row("complementarity (removed facts)", f"{o['complementarity']:.3f}",
                      f"{o['random_split_complementarity']:.3f}", f"{o['p_complementarity_vs_random_split']:.2g}")
    table.add_row("drop of P, whole set", f"{o['drop_all']:.3f}", f"{o['drop_matched_all']:.3f}",
                  f"{o['p_drop_all_vs_matched']:.2g}")
    for name in ("all", "degenerate", "other"):
        fc = o.get(f"factcheck_{name}")
        if fc:
            table.add_row(f"true > corrupted completion ({name}, {fc['facts']} facts)", f"{fc['told_apart']:.3f}",
                          f"{fc['told_apart_matched']:.3f}", f"{fc['p_vs_matched']:.2g}")
    Console(width=160).print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["per_fact"]
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    single = [max(r["drop_a"], r["drop_b"]) for r in rows]
    whole = [r["drop_all"] for r in rows]
    ax.scatter(single, whole, s=12, c=["tab:red" if r["degenerate"] else "tab:blue" for r in rows])
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.plot([-0.5, 1], [-0.5, 1], color="black", lw=0.5)
    ax.set_xlabel("drop of P(answer), the stronger group alone")
    ax.set_ylabel("drop of P(answer), both groups")
    ax.set_title(f"{result['model']}: red = degenerate ({result['overall'].get('degenerate')} facts)", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fact_options(p, DEFAULT_RELATIONS)
    p.add_argument("--split-seeds", type=int, default=5, help="random splits per fact")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "pararel"
    config = DegenerateConfig(relations=args.relations, facts=args.facts, scan=args.scan, seeds=args.seeds,
                              split_seeds=args.split_seeds, controls=["matched"])
    ref = resolve_model(args.model)
    out = output_path(args, f"degenerate-{ref.name}")
    model, tok = load_hf_model(ref)
    log(f"degenerate knowledge neurons on {folder}: {config.facts} known facts")
    result = DegenerateProtocol(model, tok, ref, folder, config, default_cache("knowledge")).run()
    return publish(result, out, "repro_degenerate.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
