"""Knowledge neurons (Dai et al. 2022) on PARAREL with a real model (default SmolLM2-135M-Instruct): a thin driver of
``kn_steer.eval.protocols.knowledge`` (known facts, the ``kn`` method per fact, suppress x0 /
enhance x2 against per-layer matched and uniform random neurons, paired signed-rank tests).

    python benchmarks/repro_knowledge_neurons.py                     # ../shared/data/pararel
    python benchmarks/repro_knowledge_neurons.py --data my_pararel --facts 50

Results go to repro-results/kn-pararel.json (+ .png) unless --out says otherwise; a published
result is only replaced with --force. Per-fact localization and effects are cached: a rerun resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repro_common import add_common, add_fact_options, data_dir, log, output_path, publish, setup_threads

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.knowledge import (
    DEFAULT_RELATIONS,
    KnowledgeConfig,
    KnowledgeProtocol,
)
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    o = result["overall"]
    controls = result["config"]["controls"]
    table = Table(title=f"Knowledge neurons: {o['facts']} facts, relative change of P(answer) (mean / median)")
    table.add_column("dose")
    for col in ["knowledge neurons"] + [f"{k} random" for k in controls] + [f"p vs {k}" for k in controls]:
        table.add_column(col, justify="right")
    for dose in ("suppress", "enhance"):
        cells = [f"{100 * o[name]['mean']:+.1f} % / {100 * o[name]['median']:+.1f} %"
                 for name in [dose] + [f"{k}_{dose}" for k in controls]]
        table.add_row(dose, *cells, *[f"{o[f'p_{dose}_vs_{k}']:.2g}" for k in controls])
    Console(width=160).print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = result["overall"]
    if not o.get("facts"):
        return
    controls = result["config"]["controls"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, dose in zip(axes, ("suppress", "enhance")):
        names = [dose] + [f"{k}_{dose}" for k in controls]
        vals = [100 * o[n]["mean"] for n in names]
        ax.bar(["knowledge neurons"] + [f"{k} random" for k in controls], vals, color=["tab:blue", "grey", "silver"])
        ax.axhline(0, color="black", lw=0.8)
        factor = result["config"]["suppress_factor" if dose == "suppress" else "enhance_factor"]
        ax.set_title(f"{dose} (x{factor:g}), {o['facts']} facts")
        ax.set_ylabel("mean relative change of P(answer) (%)")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fact_options(p, DEFAULT_RELATIONS)
    p.add_argument("--paraphrases", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--controls", default="matched,uniform")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    folder = args.data or data_dir() / "pararel"
    config = KnowledgeConfig(relations=args.relations, facts=args.facts, paraphrases=args.paraphrases,
                             scan=args.scan, steps=args.steps, seeds=args.seeds,
                             controls=[c for c in args.controls.split(",") if c])
    out = output_path(args, f"kn-{Path(folder).name}")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    log(f"knowledge neurons on {folder}: {config.facts} known facts over {len(config.relations)} relations")
    result = KnowledgeProtocol(model, tok, ref, folder, config, default_cache("knowledge")).run()
    return publish(result, out, "repro_knowledge_neurons.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
