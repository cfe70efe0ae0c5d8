"""Relation-specific neurons on PARAREL with a real model (default SmolLM2-135M-Instruct): a thin driver of
``kn_steer.eval.protocols.relation`` (cumulativity over N, the full interference matrix against
every relation the model knows, uniform and per-layer matched random rows).

    python benchmarks/repro_relation.py                               # ../shared/data/pararel
    python benchmarks/repro_relation.py --data my_pararel_folder      # any folder in the PARAREL layout
    python benchmarks/repro_relation.py --ship P36:10 P37:100         # also write these sets

Results go to repro-results/relation-pararel.json (+ .png) unless --out says otherwise; a
published result is only replaced with --force; sets are only written with --ship. Every
activation pass and scored condition is cached: a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from repro_common import (
    SHIPPED,
    add_common,
    data_dir,
    display_path,
    log,
    model_title,
    output_path,
    set_prefix,
    setup_threads,
)

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.relation import RelationConfig, RelationProtocol
from kn_steer.fileio import atomic_savefig, atomic_write_json
from kn_steer.models import load_hf_model, resolve_model


def print_table(result: dict[str, Any], n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["matrices"][str(n)]
    table = Table(title=f"Interference at N={n}: accuracy on the known held-out prompts of each relation")
    for col in ("suppressed", "on itself", "mean off-target", "worst off-target", "matched random: itself / mean off",
                "p vs matched (max)"):
        table.add_column(col, justify="left" if col == "suppressed" else "right")
    for r, row in m["rows"].items():
        matched = row.get("matched")
        ctrl, pmax = "-", "-"
        if matched:
            off = [a for c, a in matched["accuracy"].items() if c != r]
            ctrl = f"{matched['accuracy'][r]:.2f} / {sum(off) / len(off):.2f}"
            pmax = f"{max(matched['p_set_vs_control_on_relation']):.2g}"
        worst = row["worst_off_target"]
        table.add_row(r, f"{row['accuracy'][r]:.2f}", f"{row['mean_off_target']:.2f}",
                      f"{worst['relation']} {worst['accuracy']:.2f}", ctrl, pmax)
    Console(width=160).print(table)


def plot(result: dict[str, Any], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rels = result["evaluated"]
    m = result["matrices"][str(n)]
    rows = list(m["rows"])
    grid = np.array([[m["rows"][r]["accuracy"][c] for c in rels] for r in rows]
                    + [[m["uniform"]["accuracy"][c] for c in rels]])
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(rels)), rels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows) + 1), rows + ["uniform random"], fontsize=7)
    ax.set_xlabel("evaluated relation (known held-out prompts)")
    ax.set_ylabel(f"top-{n} neurons clamped to 0")
    ax.set_title(f"interference matrix, N={n}")
    fig.colorbar(im, ax=ax, fraction=0.04, label="accuracy (unsteered = 1)")
    ax = axes[1]
    counts = result["config"]["counts"]
    for r in rows:
        ax.plot(counts, [result["matrices"][str(k)]["rows"][r]["accuracy"][r] for k in counts], "o-", lw=1, ms=3,
                label=r)
    ax.plot(counts, [sum(result["matrices"][str(k)]["uniform"]["accuracy"].values()) / len(rels) for k in counts],
            "k--", lw=2, label="uniform random (mean)")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("neurons clamped (N)")
    ax.set_ylabel("accuracy on the suppressed relation")
    ax.set_title("cumulativity")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    atomic_savefig(fig, path)


def description(r: str, n: int, result: dict[str, Any]) -> str:
    row = result["matrices"][str(n)]["rows"][r]
    matched = row.get("matched")
    worst = row["worst_off_target"]
    known = result["known_prompts"]
    text = (f"Relation-specific neurons of PARAREL relation {r} in {model_title(result['model'])}: the {n} MLP "
            f"neurons whose last-token activation "
            f"best separates {r} prompts from the other {result['corpus']['relations'] - 1} relations' prompts "
            f"(average precision, train split). Default: clamp to 0 (suppress the relation). Measured on known "
            f"held-out prompts: {r} accuracy 1.00 -> {row['accuracy'][r]:.2f} ({known[r]} prompts); over the other "
            f"{len(result['evaluated']) - 1} relations the model knows, mean {row['mean_off_target']:.2f}, worst "
            f"off-target {worst['relation']} {worst['accuracy']:.2f} ({known[worst['relation']]} prompts)")
    if matched:
        off = [a for c, a in matched["accuracy"].items() if c != r]
        text += (f"; {n} random neurons with the same per-layer counts: {r} {matched['accuracy'][r]:.2f}, "
                 f"others {sum(off) / len(off):.2f}")
    return text + "."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="PARAREL folder (default ../shared/data/pararel)")
    p.add_argument("--counts", nargs="+", type=int, default=[10, 50, 100, 500, 1000])
    p.add_argument("--matched-counts", nargs="+", type=int, default=[100],
                   help="N values with per-layer matched random rows for every relation (shipped cells get them too)")
    p.add_argument("--matched-extra", nargs="*", default=[], metavar="REL:N",
                   help="more cells with matched random rows (the shipped ones are added)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--test-facts", type=int, default=150)
    p.add_argument("--test-prompts", type=int, default=2)
    p.add_argument("--min-known", type=int, default=10)
    p.add_argument("--rows", nargs="*", default=None, metavar="REL",
                   help="suppressed relations (matrix rows; default every evaluated relation; --ship adds its own)")
    p.add_argument("--table-n", type=int, default=100, help="the N of the printed table and the heatmap")
    p.add_argument("--ship", nargs="*", default=[], metavar="REL:N", help="write neuron_sets/<model>-relation-REL.json")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "pararel"
    ships: dict[str, int] = {}
    extra: dict[str, list[int]] = {}
    for flag in ("ship", "matched_extra"):
        for item in getattr(args, flag):
            rel, _, n = item.partition(":")
            if not n.isdigit():
                p.error(f"--{flag.replace('_', '-')} {item}: give REL:N")
            if flag == "ship":
                ships[rel] = int(n)
            if int(n) not in args.matched_counts:
                extra.setdefault(rel, []).append(int(n))
    config = RelationConfig(counts=sorted(set(args.counts) | set(ships.values())),
                            matched_counts=sorted(set(args.matched_counts)),
                            matched_extra=extra,
                            rows=None if args.rows is None else list(dict.fromkeys([*args.rows, *ships])),
                            seeds=args.seeds, test_facts=args.test_facts, test_prompts=args.test_prompts,
                            min_known=args.min_known)
    out = output_path(args, f"relation-{Path(folder).name}")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    protocol = RelationProtocol(model, tok, ref, folder, config, default_cache("relation"))
    log(f"relation protocol on {folder}: {len(protocol.corpus)} train prompts")
    result = protocol.run()
    result["command"] = "python benchmarks/repro_relation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_json(out, result)
    plot(result, args.table_n, out.with_suffix(".png"))
    print_table(result, args.table_n)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    for rel, n in ships.items():
        if rel not in result["evaluated"]:
            raise SystemExit(f"--ship {rel}: fewer than {config.min_known} known held-out prompts, not evaluated")
        target = SHIPPED / f"{set_prefix(ref.name)}-relation-{rel}.json"
        row = result["matrices"][str(n)]["rows"][rel]
        metrics = {"n": n, "known_prompts": result["known_prompts"][rel], "acc_relation": row["accuracy"][rel],
                   "acc_by_relation": row["accuracy"], "worst_off_target": row["worst_off_target"],
                   "mean_off_target": row["mean_off_target"], "matched_random": row.get("matched"),
                   "uniform_random": result["matrices"][str(n)]["uniform"], "results": display_path(out),
                   "protocol_command": result["command"]}
        ns = protocol.build_set(rel, n, target, name=target.stem, description=description(rel, n, result),
                                metrics=metrics, command_data=display_path(folder), command_out=display_path(target))
        evaluated = [(l, i) for l, i, _ in protocol.top_neurons(sorted({c.relation for c in protocol.corpus}))[rel][:n]]
        if [(x.layer, x.index) for x in ns.neurons] != evaluated:
            raise SystemExit(f"{target}: the relation method's set differs from the neurons the protocol evaluated")
        log(f"wrote {target} (the same {n} neurons the protocol evaluated)")
    return result


if __name__ == "__main__":
    main()
