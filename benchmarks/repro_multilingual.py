"""Multilingual knowledge neurons (#18 item 3; MATRICE, AMIG) on mLAMA with a real model (default
Gemma-3-270M, the multilingual one): a thin driver of ``kn_steer.eval.protocols.multilingual``
(facts known in English and other languages, per-query attribution with ``kn-multilingual``,
language-agnostic neurons, English neurons suppressed in the other languages against random
neurons, and neurons localized without a language tested on it by three rules).

    python benchmarks/repro_multilingual.py                              # ../shared/data/mlama
    python benchmarks/repro_multilingual.py --facts 30 --languages en,de,it

Results go to repro-results/multilingual.json (+ .png) unless --out says otherwise; a published
result is only replaced with --force. Attributions and effects are cached: a rerun resumes. No set
is shipped: mLAMA is CC BY-NC.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, log, output_path, publish, setup_threads

from kn_steer.data.mlama import DEFAULT_LANGUAGES
from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.multilingual import ML_RELATIONS, RULES, MultilingualConfig, protocol
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model


def _cell(entry: dict[str, Any], name: str) -> str:
    s = entry.get(name) or {}
    return "-" if s.get("mean") is None else f"{100 * s['mean']:+.1f} / {100 * s['median']:+.1f} %"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    a = result["agnostic"]
    console.print(f"{result['facts']['used']} facts, by language {result['facts']['by_language']}; "
                  f"language-agnostic neurons: {a['facts_with_agnostic']} of {a['facts']} facts have some "
                  f"(mean {a['mean_agnostic']:.2f} per fact; mean coarse set per language {a['mean_coarse_per_language']:.1f})")
    controls = result["config"]["controls"]
    t = result["transfer"]
    table = Table(title="English knowledge neurons suppressed: mean / median relative change of P(answer)")
    for col in ["measured on", "facts", "English neurons", *(f"{k} random" for k in controls), *(f"p vs {k}" for k in controls)]:
        table.add_column(col, justify="left" if col == "measured on" else "right")
    rows = [("English (localized)", t["source_localized"]), ("other languages", t["other_languages"]),
            ("  answer token differs", t["other_languages_different_first_token"]),
            ("  answer token shared", t["other_languages_same_first_token"]),
            *((f"  {lang}", e) for lang, e in t["by_language"].items())]
    for name, e in rows:
        table.add_row(name, str(e["set"]["n"]), _cell(e, "set"), *(_cell(e, k) for k in controls),
                      *(_p(e.get(f"p_vs_{k}")) for k in controls))
    console.print(table)
    h = result["held_out"]
    table = Table(title="Neurons localized without language L, suppressed, measured on L (vs matched random)")
    for col in ["pairs", "rule", "pairs with neurons", "mean neurons", "set", "matched random", "p vs matched"]:
        table.add_column(col, justify="left" if col in ("pairs", "rule") else "right")
    for split in ("all", "different_first_token"):
        for rule in RULES:
            e = h[split][rule]
            table.add_row(f"{split} ({h[split]['pairs']})", rule, str(e["pairs_with_neurons"]),
                          "-" if e["mean_neurons"] is None else f"{e['mean_neurons']:.1f}", _cell(e, "set"),
                          _cell(e, "matched"), _p(e.get("p_vs_matched")))
    console.print(table)
    for split in ("all", "different_first_token"):
        parts = []
        for k, v in h[split].items():
            if "_vs_" in k:
                diff = v["median_difference"]
                parts.append(f"{k}: p {_p(v['p'])}, median difference "
                             + ("-" if diff is None else f"{100 * diff:+.1f} points"))
        console.print(f"{split}: " + "; ".join(parts))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    a = result["agnostic"]
    layers = sorted({int(k) for k in (*a["coarse_layers"], *a["agnostic_layers"])})
    total_c = max(sum(a["coarse_layers"].values()), 1)
    total_a = max(sum(a["agnostic_layers"].values()), 1)
    axes[0].plot(layers, [a["coarse_layers"].get(str(x), a["coarse_layers"].get(x, 0)) / total_c for x in layers],
                 label="all coarse neurons", color="grey")
    axes[0].plot(layers, [a["agnostic_layers"].get(str(x), a["agnostic_layers"].get(x, 0)) / total_a for x in layers],
                 label="language-agnostic", color="tab:red")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("share of neurons")
    axes[0].set_title(f"agnostic neurons in {a['facts_with_agnostic']}/{a['facts']} facts")
    axes[0].legend(fontsize=8)
    controls = result["config"]["controls"]
    t = result["transfer"]
    groups = [("en", t["source_localized"])] + [(lang, e) for lang, e in t["by_language"].items() if e["set"]["n"]]
    width = 0.8 / (1 + len(controls))
    for k, (name, color) in enumerate((("set", "tab:red"), *zip(controls, ("tab:cyan", "silver")))):
        axes[1].bar([i + k * width for i in range(len(groups))], [100 * (e[name]["mean"] or 0) for _, e in groups],
                    width, color=color, label="English neurons" if name == "set" else f"{name} random")
    axes[1].set_xticks([i + width for i in range(len(groups))], [f"{g}\n(n={e['set']['n']})" for g, e in groups])
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("relative change of P(answer) (%)")
    axes[1].set_title("English neurons suppressed, per language")
    axes[1].legend(fontsize=8)
    h = result["held_out"]["all"]
    for i, rule in enumerate(RULES):
        e = h[rule]
        if e["set"]["mean"] is None:
            continue
        axes[2].bar(i - 0.2, 100 * e["set"]["mean"], 0.4, color="tab:red", label="rule's neurons" if i == 0 else None)
        axes[2].bar(i + 0.2, 100 * e["matched"]["mean"], 0.4, color="tab:cyan", label="matched random" if i == 0 else None)
    axes[2].set_xticks(range(len(RULES)), [f"{r}\n(n={h[r]['pairs_with_neurons']})" for r in RULES])
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set_ylabel("relative change of P(answer) on L (%)")
    axes[2].set_title("localized without language L, measured on L")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Multilingual knowledge neurons on {result['model']} (mLAMA)")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="mLAMA folder (default ../shared/data/mlama)")
    p.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES))
    p.add_argument("--relations", nargs="+", default=ML_RELATIONS)
    p.add_argument("--facts", type=int, default=60)
    p.add_argument("--min-languages", type=int, default=2)
    p.add_argument("--scan", type=int, default=300, help="facts screened per relation")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--controls", default="matched,uniform")
    add_common(p)
    p.set_defaults(model="gemma3-270m")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "mlama"
    config = MultilingualConfig(languages=args.languages.split(","), relations=args.relations, facts=args.facts,
                                min_languages=args.min_languages, scan=args.scan, steps=args.steps,
                                spread=args.spread, seeds=args.seeds,
                                controls=[c for c in args.controls.split(",") if c])
    out = output_path(args, "multilingual")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    log(f"multilingual knowledge neurons on {folder}: {config.facts} facts over {config.languages}")
    result = protocol(model, tok, ref, folder, config, default_cache("knowledge")).run()
    return publish(result, out, "repro_multilingual.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
