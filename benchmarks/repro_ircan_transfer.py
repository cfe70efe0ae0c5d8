"""Does an IRCAN context set transfer? A thin driver of ``kn_steer.eval.protocols.ircan``: the set
each dataset chose on its own dev split, scored on the other dataset's test split (three scoring
rules, per-layer matched and uniform random controls), and one set localized over both.

    python benchmarks/repro_ircan_transfer.py                          # MemoTrap <-> COSE_KRE
    python benchmarks/repro_ircan_transfer.py --a-dev x_dev.json --a-test x_test.json --b-dataset kre
    python benchmarks/repro_ircan_transfer.py --a-result benchmarks/results/ircan_memotrap.json \
        --b-result benchmarks/results/ircan_kre.json     # the sets of finished runs, not localized again

Results go to repro-results/ircan-transfer.json (+ .png) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from repro_common import add_common, log, output_path, setup_threads
from repro_ircan import PRESETS, add_config_args, config_of, dataset_of

from kn_steer.data import content_sha256
from kn_steer.eval.api import HFEvaluator
from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols import ircan
from kn_steer.eval.scoring import RULES
from kn_steer.fileio import atomic_savefig, atomic_write_json


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combined = result.get("combined")
    runs = result["transfer"] + ([{"source": "both", "target": t, **v}
                                  for t, v in combined["chosen_by_rule"][result["rule"]]["per_dataset"].items()]
                                 if combined else [])
    fig, axes = plt.subplots(1, len(RULES), figsize=(4.2 * len(RULES), 4), sharey=True)
    for ax, rule in zip(axes, RULES):
        labels, groups = [], []
        for run in runs:
            h = ircan.headline(run, rule)
            labels.append(f"{run['source']}\n→ {run['target']}")
            groups.append([h["unsteered"]["accuracy"], h["set"]["accuracy"],
                           *(h[kind]["accuracy"]["mean"] if kind in h else 0.0 for kind in ("matched", "uniform"))])
        for k, (name, color) in enumerate((("unsteered", "#888"), ("set", "#c33"), ("matched random", "#39c"),
                                           ("uniform random", "#9bd"))):
            ax.bar([i + (k - 1.5) * 0.2 for i in range(len(runs))], [g[k] for g in groups], 0.2, color=color,
                   label=name)
        ax.set_xticks(range(len(runs)), labels, fontsize=8)
        ax.set_title(f"{rule} log-prob")
        ax.set_ylim(0, 1.1)
    axes[0].set_ylabel("test accuracy (context-faithful)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"IRCAN sets across datasets (cells chosen on each source's dev by {result['rule']} log-prob)")
    fig.tight_layout()
    atomic_savefig(fig, path)


def finished(path: Path, data: ircan.ChoiceData, fingerprint: str, rule: str) -> dict[str, Any]:
    """A published IRCAN result used as a source: it must be on ``data``'s files, on this model, and
    have tested a cell chosen by ``rule``."""
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("protocol") != "ircan" or rule not in result.get("chosen_by_rule", {}):
        raise SystemExit(f"{path}: not an IRCAN result with a cell chosen by {rule}")
    if result["model_fingerprint"] != fingerprint:
        raise SystemExit(f"{path}: computed on {result['model']}, not on this model")
    if result["dataset"]["dev_sha256"] != content_sha256(data.dev):
        raise SystemExit(f"{path}: localized on another dev file than {data.dev}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for side, default in (("a", "memotrap"), ("b", "kre")):
        p.add_argument(f"--{side}-dataset", choices=sorted(PRESETS), default=default)
        p.add_argument(f"--{side}-dev", type=Path)
        p.add_argument(f"--{side}-test", type=Path)
        p.add_argument(f"--{side}-format", choices=["memotrap", "kre"])
        p.add_argument(f"--{side}-name")
        p.add_argument(f"--{side}-result", type=Path, metavar="RESULT",
                       help="a finished repro_ircan.py result on this dataset: its chosen set is used as it is")
    add_config_args(p)
    add_common(p)
    p.add_argument("--rule", choices=RULES, default="total", help="the rule whose chosen cells transfer")
    p.add_argument("--transfer-controls", default="matched", help="random control kinds on the other dataset")
    p.add_argument("--combined-hs", default="10,40,80", help="grid of h for the set localized over both")
    p.add_argument("--combined-betas", default="2,4", help="grid of beta for the set localized over both")
    p.add_argument("--combined-loc-n", type=int, default=None,
                   help="dev items per dataset localizing the combined set (default --loc-n; half of it gives "
                        "the combined set the same localization budget as each single set)")
    p.add_argument("--no-combined", action="store_true", help="skip the set localized over both datasets")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    a, b = dataset_of(args, "a_"), dataset_of(args, "b_")
    config = config_of(args)
    out = output_path(args, "ircan-transfer")
    ev = HFEvaluator(args.model, batch_size=config.batch_size, cache=default_cache("ircan"))
    runs = {d.name: finished(getattr(args, f"{side}_result"), d, ev.ref.fingerprint, args.rule)
                    if getattr(args, f"{side}_result") else ircan.run(ev, d, config, rules=[args.rule])
            for side, d in (("a", a), ("b", b))}
    across = config.model_copy(update={"controls": [c for c in args.transfer_controls.split(",") if c],
                                       "control_rules": [args.rule]})
    transfer = [ircan.transfer(ev, runs[src.name], args.rule, dst, across) for src, dst in ((a, b), (b, a))]
    result = {"rule": args.rule, "datasets": [a.describe(config), b.describe(config)], "transfer": transfer,
              "own": {name: {"cell": r["chosen_by_rule"][args.rule],
                             "test": r["test"][r["chosen_by_rule"][args.rule]["result_of"]]} for name, r in runs.items()},
              "sources": {name: r.get("command") for name, r in runs.items()},
              "combined": None,
              "command": "python benchmarks/repro_ircan_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(out, result)  # the transfer is kept if the combined run is interrupted
    if not args.no_combined:
        log("one set over both datasets")
        both = across.model_copy(update={"hs": [int(h) for h in args.combined_hs.split(",")],
                                         "loc_n": args.combined_loc_n or config.loc_n,
                                         "betas": [float(b) for b in args.combined_betas.split(",")]})
        result["combined"] = ircan.run_combined(ev, [a, b], both, rules=[args.rule])
        atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for t in transfer:
        h = ircan.headline(t, args.rule)
        log(f"{t['source']} -> {t['target']}: {h['unsteered']['accuracy']:.3f} -> {h['set']['accuracy']:.3f} "
            f"(p={h['mcnemar']['p_value']:.2g}; matched {h['matched']['accuracy']['mean']:.3f})")
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
