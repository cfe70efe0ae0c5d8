"""Reproduce IRCAN (Shi et al. 2024) on a real model (default SmolLM2-135M-Instruct): a thin driver of
``kn_steer.eval.protocols.ircan`` (localize on dev, h x beta grid on held-out dev, test against
unsteered and random controls, under three scoring rules).

    python benchmarks/repro_ircan.py --dataset memotrap            # ../shared/data/memotrap
    python benchmarks/repro_ircan.py --dev my_dev.json --test my_test.json   # any file in a supported schema
    python benchmarks/repro_ircan.py --dataset memotrap --ship              # also write the set
    python benchmarks/repro_ircan.py --dataset memotrap --retest R.json --seeds 5   # R's sets, new controls

Results go to repro-results/ircan-<name>.json (+ .png) unless --out says otherwise; a published
result in benchmarks/results/ is only replaced with --force; a set is only written with --ship.
Everything is cached ($KN_STEER_CACHE): an interrupted run resumes, a finished one reruns in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from repro_common import (
    add_common,
    data_dir,
    display_path,
    log,
    model_title,
    output_path,
    set_prefix,
    setup_threads,
    ship_path,
)

from kn_steer.data import detect_format
from kn_steer.eval.api import HFEvaluator
from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols import ircan
from kn_steer.eval.scoring import LENGTH_GROUPS, RULES
from kn_steer.fileio import atomic_savefig, atomic_write_json
from kn_steer.sets.format import NeuronSet

PRESETS = {"memotrap": ("memotrap/dev.jsonl", "memotrap/test.jsonl"), "kre": ("kre/cose_dev.json", "kre/cose_test.json")}


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=sorted(PRESETS), help="a dataset of ../shared/data")
    p.add_argument("--dev", type=Path, help="dev file (MemoTrap or COSE_KRE schema, any name)")
    p.add_argument("--test", type=Path, help="test file (same schema)")
    p.add_argument("--format", choices=["memotrap", "kre"], help="default: from the file's fields")
    p.add_argument("--name", help="label of the dataset in outputs (default: --dataset or the dev file's stem)")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loc-n", type=int, default=200, help="first dev items used to localize")
    p.add_argument("--grid-n", type=int, default=None, help="dev items after those for the grid (default: the rest)")
    p.add_argument("--test-n", type=int, default=None, help="first test items (default: all)")
    p.add_argument("--steps", type=int, default=20, help="integrated-gradients steps m")
    p.add_argument("--k", type=int, default=20, help="neurons kept per example")
    p.add_argument("--hs", default="5,10,20,40,80", help="grid of set sizes h")
    p.add_argument("--betas", default="2,4,8", help="grid of factors beta")
    p.add_argument("--seeds", type=int, default=5, help="seeds per random control")
    p.add_argument("--controls", default="matched,uniform", help="random control kinds")
    p.add_argument("--control-rules", default="total",
                   help="rules whose chosen cell is tested against random controls (others: against unsteered)")
    p.add_argument("--batch-size", type=int, default=16)


def dataset_of(args: argparse.Namespace, prefix: str = "") -> ircan.ChoiceData:
    preset = getattr(args, f"{prefix}dataset")
    dev, test = getattr(args, f"{prefix}dev"), getattr(args, f"{prefix}test")
    if preset:
        dev = dev or data_dir() / PRESETS[preset][0]
        test = test or data_dir() / PRESETS[preset][1]
    if dev is None or test is None:
        raise SystemExit("give --dataset, or --dev and --test")
    fmt = getattr(args, f"{prefix}format") or detect_format(dev)
    return ircan.ChoiceData(getattr(args, f"{prefix}name") or preset or Path(dev).stem, fmt, dev, test)


def config_of(args: argparse.Namespace) -> ircan.IRCANConfig:
    return ircan.IRCANConfig(
        loc_n=args.loc_n, grid_n=args.grid_n, test_n=args.test_n, steps=args.steps, top_k=args.k,
        hs=[int(h) for h in args.hs.split(",")], betas=[float(b) for b in args.betas.split(",")],
        seeds=args.seeds, controls=[c for c in args.controls.split(",") if c],
        control_rules=[r for r in args.control_rules.split(",") if r], batch_size=args.batch_size)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"IRCAN on {result['dataset']['name']} test ({result['dataset']['test_split']})")
    for col in ("chosen by", "h, beta", "rule", "unsteered", "IRCAN", "p (won/lost)", "matched random", "uniform random"):
        table.add_column(col, justify="left" if col in ("chosen by", "rule") else "right")
    for chooser, cell in result["chosen_by_rule"].items():
        test = result["test"][cell["result_of"]]
        for rule in RULES:
            h = ircan.headline(test, rule)
            ctrl = [f"{h[k]['accuracy']['mean']:.3f} ± {h[k]['accuracy']['sd']:.3f}" if k in h else "-"
                    for k in ("matched", "uniform")]
            table.add_row(chooser if rule == RULES[0] else "", f"{cell['h']}, {cell['beta']:g}" if rule == RULES[0] else "",
                          rule, f"{h['unsteered']['accuracy']:.3f}", f"{h['set']['accuracy']:.3f}",
                          f"{h['mcnemar']['p_value']:.3g} ({h['mcnemar']['items_won']}/{h['mcnemar']['items_lost']})",
                          *ctrl)
    Console(width=160).print(table)


def plot(result: dict[str, Any], rule: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = result["chosen_by_rule"][rule]
    test = result["test"][cell["result_of"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["unsteered", f"IRCAN h={cell['h']} β={cell['beta']:g}", "matched random", "uniform random"]
    colors = ["#888", "#c33", "#39c", "#9bd"]
    width = 0.2
    for g, r in enumerate(RULES):
        h = ircan.headline(test, r)
        vals = [h["unsteered"]["accuracy"], h["set"]["accuracy"],
                h.get("matched", {}).get("accuracy", {}).get("mean", 0), h.get("uniform", {}).get("accuracy", {}).get("mean", 0)]
        errs = [0, 0, h.get("matched", {}).get("accuracy", {}).get("sd", 0), h.get("uniform", {}).get("accuracy", {}).get("sd", 0)]
        for k, (v, e) in enumerate(zip(vals, errs)):
            axes[0].bar(g + (k - 1.5) * width, v, width, yerr=e, color=colors[k], capsize=3,
                        label=labels[k] if g == 0 else None)
    axes[0].set_xticks(range(len(RULES)), [f"{r} log-prob" for r in RULES])
    axes[0].set_ylim(0, 1.15)
    axes[0].set_ylabel("test accuracy (context-faithful)")
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    # MemoTrap's choices are mostly of equal token length; COSE_KRE's rarely are
    groups = [grp for grp in LENGTH_GROUPS if test["set"]["rules"]["total"]["by_length"][grp]["n"]]
    for g, grp in enumerate(groups):
        for k, (cond, lab) in enumerate((("unsteered", "unsteered"), ("set", "IRCAN"))):
            for j, r in enumerate(("total", "calibrated")):
                acc = test[cond]["rules"][r]["by_length"][grp]["accuracy"] or 0.0
                axes[1].bar(g + (2 * k + j - 1.5) * width, acc, width, color=colors[k], alpha=1.0 if j == 0 else 0.5,
                            label=f"{lab}, {r}" if g == 0 else None)
    n = {grp: test["set"]["rules"]["total"]["by_length"][grp]["n"] for grp in groups}
    axes[1].set_xticks(range(len(groups)), [f"correct choice {grp}\n({n[grp]} items)" for grp in groups])
    axes[1].set_ylim(0, 1.15)
    axes[1].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(f"IRCAN on {result['dataset']['name']} ({test['n']} test items), cell chosen on dev by {rule} log-prob")
    fig.tight_layout()
    atomic_savefig(fig, path)


def survives(test: dict[str, Any], rule: str, alpha: float = 0.05) -> bool:
    """The set beats unsteered (McNemar p < alpha) and the mean of its matched random controls."""
    h = ircan.headline(test, rule)
    better = h["set"]["accuracy"] > h["unsteered"]["accuracy"] and h["mcnemar"]["p_value"] < alpha
    return better and ("matched" not in h or h["set"]["accuracy"] > h["matched"]["accuracy"]["mean"])


def _dose_effect(test: dict[str, Any], rule: str, alpha: float = 0.05) -> bool:
    """Some random control raises accuracy significantly and the set is not above all of them."""
    h = ircan.headline(test, rule)
    for kind in ("matched", "uniform"):
        ctrl = test.get("controls", {}).get(kind, {}).get(rule)
        if not ctrl:
            continue
        raised = any(p < alpha and s["accuracy"] > h["unsteered"]["accuracy"]
                     for p, s in zip(ctrl["p_vs_unsteered"], ctrl["per_seed"]))
        if raised and max(h[kind]["p_set_vs_control"]) >= alpha:
            return True
    return False


def verdict(test: dict[str, Any]) -> str:
    """Which scoring rules the gain survives, and what losing each one means."""
    kept = [r for r in RULES if survives(test, r)]
    if not kept:
        return "No significant gain under any scoring rule (McNemar p < 0.05 and above matched random neurons)."
    text = f"Significant gain (p < 0.05, above matched random neurons) under {', '.join(kept)} scoring"
    if "total" in kept and "mean" not in kept:
        text += "; not under length-normalized scoring: it is mostly a preference for shorter answers"
    dose = [r for r in kept if _dose_effect(test, r)]
    if dose:
        text += (f"; but under {', '.join(dose)} scoring random neurons at the same dose raise accuracy too (a control "
                 "seed beats unsteered with p < 0.05 and the set does not beat every control seed): part of the gain "
                 "comes from the dose, not from these neurons")
    if "calibrated" not in kept:
        text += ("; not under calibrated scoring (log-prob after the prompt minus log-prob after the neutral premise "
                 "'Answer:'): the set raises the faithful choices' probability after the neutral premise too, so the "
                 "gain is mostly a shift of the choices' prior rather than a better use of the context")
    return text + "."


def description(name: str, result: dict[str, Any], rule: str) -> str:
    model = model_title(result["model"])
    cell = result["chosen_by_rule"][rule]
    test = result["test"][cell["result_of"]]
    parts = []
    for r in RULES:
        h = ircan.headline(test, r)
        uniform = (f", uniform random {h['uniform']['accuracy']['mean']:.3f} ± {h['uniform']['accuracy']['sd']:.3f}"
                   if "uniform" in h else "")
        parts.append(f"{r} log-prob {h['unsteered']['accuracy']:.3f} -> {h['set']['accuracy']:.3f} "
                     f"(p={h['mcnemar']['p_value']:.2g}; matched random {h['matched']['accuracy']['mean']:.3f} "
                     f"± {h['matched']['accuracy']['sd']:.3f}{uniform})")
    base, mine = test["unsteered"]["rules"]["total"]["by_length"], test["set"]["rules"]["total"]["by_length"]
    return (f"IRCAN context-aware neurons of {model} found on {name} dev "
            f"({result['config']['loc_n']} examples, m={result['config']['steps']}, top {result['config']['top_k']} per "
            f"example, the h={cell['h']} most frequent; h and beta chosen on held-out dev by {rule} log-prob); default: "
            f"scale by {cell['beta']:g}. Test accuracy ({test['n']} items): " + "; ".join(parts) +
            ". By the correct choice's relative length in tokens (total log-prob): " +
            ", ".join(f"{grp} ({base[grp]['n']} items) {base[grp]['accuracy']:.2f} -> {mine[grp]['accuracy']:.2f}"
                      for grp in LENGTH_GROUPS if base[grp]["n"]) + ". " + verdict(test))


def refresh_set(path: Path, text: str, metrics: dict[str, Any]) -> NeuronSet:
    """The shipped set at ``path`` with a new description and test metrics (its neurons, method and
    provenance, and the localization's own metrics, are kept)."""
    old = NeuronSet.load(path)
    kept = {k: v for k, v in old.metrics.items() if not k.startswith("test_")}
    ns = old.model_copy(update={"description": text, "metrics": {**kept, **metrics}})
    NeuronSet.model_validate(ns.model_dump())
    ns.save(path)
    return ns


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_config_args(p)
    add_common(p)
    p.add_argument("--ship", nargs="?", const="", default=None, metavar="PATH",
                   help="write the set (default neuron_sets/<model>-context-<name>.json)")
    p.add_argument("--ship-rule", choices=RULES, default="total", help="the rule whose chosen cell is shipped")
    p.add_argument("--retest", type=Path, metavar="RESULT",
                   help="keep RESULT's localization and grid (a result of this script on the same data and model) "
                        "and score its sets on test again under --controls/--seeds; with --ship, the shipped set "
                        "(its neurons must be RESULT's) gets the new description and metrics")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    data, config = dataset_of(args), config_of(args)
    if args.ship is not None and args.ship_rule not in config.control_rules:
        p.error(f"--ship-rule {args.ship_rule} needs random controls: add it to --control-rules")
    out = output_path(args, f"ircan-{data.name}")
    ev = HFEvaluator(args.model, batch_size=config.batch_size, cache=default_cache("ircan"))
    command = "python benchmarks/repro_ircan.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.retest is not None:
        log(f"IRCAN on {data.name}: the sets of {args.retest} on test again ({config.seeds} seeds)")
        source = json.loads(args.retest.read_text(encoding="utf-8"))
        result = ircan.retest(ev, source, data, config)
        result["retested_from"] = {"command": source.get("command"), "config": source["config"]}
        config = ircan.IRCANConfig(**result["config"])
    else:
        log(f"IRCAN on {data.name}: localize {config.loc_n} dev items, grid, test")
        result = ircan.run(ev, data, config)
    result["command"] = command
    atomic_write_json(out, result)
    plot(result, args.ship_rule, out.with_suffix(".png"))
    print_table(result)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    target = ship_path(args.ship, f"{set_prefix(ev.ref.name)}-context-{data.name}")
    if target is not None:
        cell = result["chosen_by_rule"][args.ship_rule]
        test = result["test"][cell["result_of"]]
        metrics = {"split": data.describe(config)["test_split"], "chosen_by": args.ship_rule,
                   **{f"test_{r}": ircan.headline(test, r) for r in RULES},
                   "results": display_path(out), "protocol_command": result["command"]}
        text = description(data.name, result, args.ship_rule)
        if args.retest is not None:
            ns = refresh_set(target, text, metrics)
        else:
            ns = ircan.build_set(ev, data, config, cell["h"], cell["beta"], target, name=target.stem,
                                 description=text, metrics=metrics,
                                 command_data=display_path(data.dev), command_out=display_path(target))
        if [[x.layer, x.index] for x in ns.neurons] != test["neurons"]:
            raise SystemExit(f"{target}: the ircan method's set differs from the neurons the protocol evaluated")
        log(f"wrote {target} (the same {len(ns.neurons)} neurons the protocol evaluated)")
    return result


if __name__ == "__main__":
    main()
