"""Query localization (Chen et al.) on PARAREL with a real model (default SmolLM2-135M-Instruct): a thin
driver of ``kn_steer.eval.protocols.query_localization`` (per-query knowledge neurons, their
consistency across a fact's paraphrases against same-template pairs of other facts, K_C / K_I by
Otsu's threshold, and suppression on paraphrases never used to localize, Dai et al.'s rule vs the
consistency-aware rule, against matched and uniform random neurons).

    python benchmarks/repro_query_localization.py                       # ../shared/data/pararel
    python benchmarks/repro_query_localization.py --model gemma3-270m --facts 60

Results go to repro-results/query-localization.json (+ .png) unless --out says otherwise; a
published result is only replaced with --force. Attributions and effects are cached: a rerun resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro_common import add_common, add_fact_options, data_dir, log, output_path, publish, setup_threads

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.query_localization import QL_RELATIONS, RULES, QueryLocalizationConfig, protocol
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model

PAIRS = {"same_fact_other_template": "same fact,\nother template", "other_fact_same_template": "other fact,\nsame template",
         "other_fact_other_template": "other fact,\nother template"}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = result["consistency"]
    console = Console(width=160)
    console.print(f"consistency (mean Jaccard of per-query coarse sets): Otsu cut {c['otsu_threshold']:.3f}, "
                  f"K_C {c['consistent_facts']} facts, K_I {c['inconsistent_facts']} facts; pairs: " +
                  ", ".join(f"{k} {v['mean']:.3f} (n={v['n']})" for k, v in c["jaccard"].items() if v["mean"] is not None))
    controls = result["config"]["controls"]
    table = Table(title="Suppression: mean / median relative change of P(answer) on held-out paraphrases")
    for col in ["facts", "rule", "facts with neurons", "mean neurons", "set", *(f"{k} random" for k in controls),
                *(f"p vs {k}" for k in controls)]:
        table.add_column(col, justify="left" if col in ("facts", "rule") else "right")
    for group, summary in result["modification"].items():
        for rule in RULES:
            e = summary[rule]
            held = e.get("held_out")
            if held is None:
                table.add_row(group, rule, str(e["facts_with_neurons"]), "-", "-", *["-"] * (2 * len(controls)))
                continue
            cells = [f"{100 * held[k]['mean']:+.1f} / {100 * held[k]['median']:+.1f} %" for k in ("set", *controls)]
            table.add_row(group, rule, str(e["facts_with_neurons"]), f"{e['mean_neurons']:.1f}", *cells,
                          *[f"{held[f'p_vs_{k}']:.2g}" for k in controls])
    console.print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["consistency"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    scores = [s for s in c["per_fact"] if s is not None]
    axes[0].hist(scores, bins=20, color="tab:blue")
    axes[0].axvline(c["otsu_threshold"], color="black", ls="--", label=f"Otsu {c['otsu_threshold']:.2f}")
    axes[0].set_xlabel("fact's consistency (mean Jaccard over its paraphrase pairs)")
    axes[0].set_ylabel("facts")
    axes[0].legend()
    kinds = [k for k in PAIRS if c["jaccard"][k]["mean"] is not None]
    axes[1].bar([PAIRS[k] for k in kinds], [c["jaccard"][k]["mean"] for k in kinds], color=["tab:blue", "tab:orange", "grey"])
    axes[1].set_ylabel("mean Jaccard of coarse sets")
    axes[1].set_title("neuron overlap of two queries")
    controls = result["config"]["controls"]
    groups = [g for g in ("consistent", "inconsistent") if result["modification"][g]["facts"]]
    labels, width = [], 0.8 / (2 + len(controls))
    for g, group in enumerate(groups):
        for r, rule in enumerate(RULES):
            held = result["modification"][group][rule].get("held_out")
            if held is None:
                continue
            x = g * 2 + r
            labels.append((x, f"{group}\n{rule}"))
            for k, (name, color) in enumerate((("set", "tab:red"), *zip(controls, ("tab:cyan", "silver")))):
                axes[2].bar(x + (k - 1) * width, 100 * held[name]["mean"], width, color=color,
                            label=("knowledge neurons" if name == "set" else f"{name} random") if x == 0 else None)
    axes[2].set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=8)
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set_ylabel("relative change of P(answer), held-out paraphrases (%)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Query localization on {result['model']}")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fact_options(p, QL_RELATIONS, facts=100)
    p.add_argument("--loc-queries", type=int, default=3, help="paraphrases used to localize")
    p.add_argument("--held-out", type=int, default=3, help="paraphrases where suppression is measured")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--spread", type=float, default=1.0, help="consistency-aware rule: mean - spread x sd > threshold")
    p.add_argument("--controls", default="matched,uniform")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "pararel"
    config = QueryLocalizationConfig(relations=args.relations, facts=args.facts, loc_queries=args.loc_queries,
                                     held_out=args.held_out, scan=args.scan, steps=args.steps, spread=args.spread,
                                     seeds=args.seeds, controls=[c for c in args.controls.split(",") if c])
    out = output_path(args, "query-localization")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    log(f"query localization on {folder}: {config.facts} known facts, {config.paraphrases} paraphrases each")
    result = protocol(model, tok, ref, folder, config, default_cache("knowledge")).run()
    return publish(result, out, "repro_query_localization.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
