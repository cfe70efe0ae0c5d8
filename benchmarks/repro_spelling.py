"""Spelling-out ("Spelling-out is not straightforward"): knowledge neurons of a word's first and
second letter with a real model (default SmolLM2-135M-Instruct), a thin driver of
``kn_steer.eval.protocols.spelling`` (known spelling facts, the ``kn`` method per fact, where the
neurons sit per letter position, suppress x0 / enhance x2 against matched and uniform random neurons).

    python benchmarks/repro_spelling.py                     # words of ../shared/data/english/ewt_sentences.jsonl
    python benchmarks/repro_spelling.py --model gemma3-270m --facts 60

Results go to repro-results/spelling.json (+ .png) unless --out says otherwise; a published result
is only replaced with --force. Attributions and effects are cached: a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, log, output_path, setup_threads
from repro_knowledge_neurons import print_table

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.spelling import SpellingConfig, SpellingProtocol
from kn_steer.fileio import atomic_savefig, atomic_write_json
from kn_steer.models import load_hf_model, resolve_model


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for position, profile in result["layer_profile"].items():
        if profile["neurons"]:
            counts = profile["per_layer"]
            axes[0].plot(range(len(counts)), [c / profile["neurons"] for c in counts], marker="o",
                         label=f"{position} letter ({profile['neurons']} neurons, mean layer {profile['mean_layer']:.1f})")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("share of the position's knowledge neurons")
    axes[0].legend(fontsize=8)
    controls = result["config"]["controls"]
    positions = [p for p in result["config"]["relations"] if result["by_relation"][p].get("facts")]
    width = 0.8 / (1 + len(controls))
    for g, position in enumerate(positions):
        summary = result["by_relation"][position]
        for k, (name, color) in enumerate((("suppress", "tab:red"), *((f"{c}_suppress", col) for c, col
                                                                      in zip(controls, ("tab:cyan", "silver"))))):
            axes[1].bar(g + (k - 0.5 * len(controls)) * width, 100 * summary[name]["mean"], width, color=color,
                        label=("knowledge neurons" if k == 0 else f"{controls[k - 1]} random") if g == 0 else None)
    axes[1].set_xticks(range(len(positions)),
                       [f"{p} letter\n({result['by_relation'][p]['facts']} facts)" for p in positions])
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("suppress (x0): mean relative change of P(letter) (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Knowledge neurons of letters, {result['model']}")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="text JSONL the words come from (default ../shared/data/english/ewt_sentences.jsonl)")
    p.add_argument("--positions", nargs="+", default=["first", "second"])
    p.add_argument("--facts", type=int, default=100, help="known spelling facts (round-robin over positions)")
    p.add_argument("--scan", type=int, default=300, help="words screened")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5, help="seeds per random control and fact")
    p.add_argument("--controls", default="matched,uniform")
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    words = args.data or data_dir() / "english" / "ewt_sentences.jsonl"
    config = SpellingConfig(relations=args.positions, facts=args.facts, scan=args.scan, steps=args.steps,
                            seeds=args.seeds, controls=[c for c in args.controls.split(",") if c])
    out = output_path(args, "spelling")
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    log(f"spelling facts from {words}: {config.facts} known facts over {', '.join(config.relations)} letters")
    result = SpellingProtocol(model, tok, ref, words, config, default_cache("knowledge")).run()
    result["command"] = "python benchmarks/repro_spelling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print_table(result)
    for position, profile in result["layer_profile"].items():
        thirds = " / ".join("-" if s is None else f"{s:.2f}" for s in profile["share_by_third"])
        log(f"{position} letter: {profile['neurons']} neurons, share by layer third {thirds}")
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
