"""Relation-specific neurons on PARAREL with SmolLM2-135M-Instruct: cumulativity and interference.

1. Localize (``kn_steer.localize.relation``, the same corpus and code as
   ``kn-steer localize --method relation``): the last-token activation of every MLP neuron on the
   TRAIN split prompts of every PARAREL relation (34 relations, 20 facts x up to 3 patterns
   each); per relation, each neuron's average precision as a detector of that relation.
2. Evaluate on the held-out TEST split facts of the evaluated relations: the prompts the
   unsteered model completes correctly (greedy first token of the object). Deactivate (clamp 0,
   every position) the top N neurons of relation r and report the accuracy on r's prompts and
   on the other evaluated relations' prompts, for several N (cumulativity), against N random
   neurons drawn uniformly over all layers (several seeds; interference).
3. ``--ship P36:10 P37:100 ...`` writes neuron_sets/smollm2-135m-relation-<P>.json (top N, default ``--ship-count``
   neurons, clamp 0) with the measured effect and the command that reproduces the set.

Every scored condition is cached (``$KN_STEER_CACHE/bench/relation``): a rerun resumes.

    .venv/bin/python benchmarks/repro_relation.py --ship P36:10 P37:100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_steer.data.pararel import load_pararel  # noqa: E402
from kn_steer.fileio import atomic_write_json  # noqa: E402
from kn_steer.localize import relation as rel  # noqa: E402
from kn_steer.models import cache_dir, load_hf_model, resolve_model  # noqa: E402
from kn_steer.models.families import ModelShape  # noqa: E402
from kn_steer.sets.format import (  # noqa: E402
    MethodInfo,
    Neuron,
    NeuronSet,
    Operation,
    Provenance,
    model_identity,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pararel"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Cache:
    """A JSON dict on disk, rewritten atomically after every new entry (resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relations", nargs="+", default=["P36", "P1376", "P30", "P17", "P103", "P37", "P27", "P407"],
                    help="relations evaluated (accuracy on r and interference on the others)")
    ap.add_argument("--counts", nargs="+", type=int, default=[10, 50, 100, 500, 1000])
    ap.add_argument("--seeds", type=int, default=5, help="random controls per N")
    ap.add_argument("--test-facts", type=int, default=150, help="held-out facts per relation")
    ap.add_argument("--test-prompts", type=int, default=2, help="prompts per held-out fact")
    ap.add_argument("--ship", nargs="*", default=[], metavar="REL[:N]",
                    help="relations to write neuron sets for, each with its own N (default --ship-count)")
    ap.add_argument("--ship-count", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relation_pararel.json")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--min-known", type=int, default=10,
                    help="evaluate only relations with at least this many known held-out prompts")
    args = ap.parse_args()
    ship_counts = {}
    for item in args.ship:
        r, _, n = item.partition(":")
        if n and not n.isdigit():
            ap.error(f"--ship {item}: N must be a positive integer")
        ship_counts[r] = int(n) if n else args.ship_count
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    shape = ModelShape.from_config(model.config)
    work = cache_dir() / "bench" / "relation" / ref.fingerprint.replace(":", "-")
    cache = Cache(work / "results.json")
    relations = load_pararel(args.data)

    # 1. localization: AP of every neuron for each evaluated/shipped relation (top lists cached)
    wanted = list(dict.fromkeys(args.relations + list(ship_counts)))
    keep = max(max(args.counts), *ship_counts.values(), args.ship_count)
    corpus = rel.relation_prompts(relations)  # train split, the CLI's defaults
    tops: dict[str, list] = {}
    missing = [r for r in wanted if cache.get(f"top/{r}/{keep}") is None]
    if missing:
        log(f"activations of {len(corpus)} train prompts over {len({c.relation for c in corpus})} relations")
        acts = rel.last_token_activations(model, tok, [c.prompt for c in corpus])
        aps = rel.relation_ap(acts, [c.relation for c in corpus], missing)  # one sort for all
        for r in missing:
            labels = torch.tensor([c.relation == r for c in corpus])
            top = rel.top_neurons(aps[r], keep, shape.intermediate_size)
            cache.put(f"top/{r}/{keep}", top)
            log(f"{r}: top AP {top[0][2]:.3f}, AP at rank {keep} {top[-1][2]:.3f} (prevalence {float(labels.float().mean()):.3f})")
        del acts
    for r in wanted:
        tops[r] = [tuple(x) for x in cache.get(f"top/{r}/{keep}")]
    log(f"localized ({time.time() - started:.0f}s)")

    # 2. held-out prompts the unsteered model gets right
    test = rel.relation_prompts({r: relations[r] for r in args.relations}, split="test",
                                facts_per_relation=args.test_facts, prompts_per_fact=args.test_prompts)
    test_key = "baseline/" + hashlib.sha256("\n".join(t.prompt for t in test).encode()).hexdigest()[:12]
    base = cache.get(test_key)
    if base is None:
        s = rel.score_prompts(model, tok, [t.prompt for t in test], [t.target for t in test])
        base = s.correct.tolist()
        cache.put(test_key, base)
    known = [t for t, ok in zip(test, base) if ok]
    baseline_acc = {r: statistics.mean([ok for t, ok in zip(test, base) if t.relation == r]) for r in args.relations}
    known_n = {r: sum(1 for t in known if t.relation == r) for r in args.relations}
    log(f"baseline accuracy on held-out prompts: {baseline_acc}; known prompts {known_n}")

    sig = hashlib.sha256("\n".join(t.prompt + "|" + t.target for t in known).encode()).hexdigest()[:12]

    def accuracy(neurons: list[tuple[int, int]], key: str) -> dict[str, float]:
        key = f"{sig}/{key}"  # results are only reusable on the same evaluation prompts
        hit = cache.get(key)
        if hit is None:
            s = rel.score_prompts(model, tok, [t.prompt for t in known], [t.target for t in known],
                                  rel.deactivation(neurons, shape))
            hit = {r: statistics.mean([bool(c) for t, c in zip(known, s.correct.tolist()) if t.relation == r])
                   for r in args.relations if known_n[r]}
            cache.put(key, hit)
        return hit

    # 3. top-N of each relation vs random N (relations with too few known prompts are skipped)
    evaluated = [r for r in args.relations if known_n[r] >= args.min_known]
    skipped = {r: known_n[r] for r in args.relations if known_n[r] < args.min_known}
    if skipped:
        log(f"fewer than {args.min_known} known prompts, not evaluated: {skipped}")

    def pooled(acc: dict[str, float], rels: list[str]) -> float:
        """Accuracy over all prompts of ``rels`` (each relation weighted by its prompt count)."""
        return sum(acc[o] * known_n[o] for o in rels) / sum(known_n[o] for o in rels)

    rows = []
    for n in args.counts:
        randoms = [accuracy(rel.random_neurons(n, shape, seed), f"random/{n}/{seed}") for seed in range(args.seeds)]
        for r in evaluated:
            acc = accuracy([(l, i) for l, i, _ in tops[r][:n]], f"top/{r}/{n}/eval")
            others = [o for o in evaluated if o != r]
            row = {
                "relation": r, "n": n,
                "acc_relation": acc[r], "acc_others": pooled(acc, others),
                "acc_others_by_relation": {o: acc[o] for o in others},
                "random_acc_relation": statistics.mean(x[r] for x in randoms),
                "random_acc_relation_sd": statistics.stdev([x[r] for x in randoms]) if len(randoms) > 1 else 0.0,
                "random_acc_others": statistics.mean(pooled(x, others) for x in randoms),
                "random_acc_others_sd": statistics.stdev([pooled(x, others) for x in randoms]) if len(randoms) > 1 else 0.0,
                "ap_at_n": tops[r][n - 1][2],
            }
            rows.append(row)
            log(f"{r} N={n}: acc(r) {row['acc_relation']:.2f} others {row['acc_others']:.2f} | random "
                f"acc(r) {row['random_acc_relation']:.2f} others {row['random_acc_others']:.2f}")

    result = {
        "model": ref.name, "fingerprint": ref.fingerprint,
        "setup": {
            "localize": f"train split, {rel.FACTS_PER_RELATION} facts x up to {rel.PROMPTS_PER_FACT} patterns "
                        f"per relation, all {len({c.relation for c in corpus})} PARAREL relations with a usable "
                        f"pattern ({len(corpus)} prompts); AP of last-token activation",
            "evaluate": f"test split, {args.test_facts} facts x {args.test_prompts} patterns per relation; "
                        "prompts the unsteered model answers correctly (greedy first token), so unsteered "
                        "accuracy is 1.0 on this set",
            "intervention": "clamp to 0 at every position (kn_steer.reference.steer)",
            "random": f"N neurons uniform over all layers, {args.seeds} seeds, mean (sd)",
            "others": "accuracy pooled over the other evaluated relations' prompts",
        },
        "baseline_accuracy_all_heldout": baseline_acc, "known_prompts": known_n,
        "not_evaluated_too_few_known": skipped,
        "rows": rows, "seconds": round(time.time() - started, 1),
        "command": "python benchmarks/repro_relation.py " + " ".join(sys.argv[1:]),
    }
    atomic_write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out}")

    for r, n in ship_counts.items():
        ship(r, tops[r][:n], result, ref, model, args)


def ship(r: str, top: list, result: dict, ref: Any, model: Any, args: argparse.Namespace) -> None:
    row = next((x for x in result["rows"] if x["relation"] == r and x["n"] == len(top)), None)
    effect = (f" Measured (held-out PARAREL prompts the model answers correctly): accuracy on {r} "
              f"{row['acc_relation']:.2f} vs {row['acc_others']:.2f} on other relations; {len(top)} random "
              f"neurons: {row['random_acc_relation']:.2f} / {row['random_acc_others']:.2f}."
              if row else "")
    out = ROOT / "neuron_sets" / f"smollm2-135m-relation-{r}.json"
    ns = NeuronSet(
        name=f"smollm2-135m-relation-{r}",
        description=f"Relation-specific neurons of PARAREL relation {r}: the {len(top)} MLP neurons whose "
                    f"last-token activation best separates {r} prompts from other relations' prompts "
                    f"(average precision). Default: clamp to 0 (suppress the relation).{effect}",
        model=model_identity(ref, model.config),
        method=MethodInfo(name="relation", params={"relation": r, "count": len(top), "value": 0.0,
                                                   "facts_per_relation": rel.FACTS_PER_RELATION,
                                                   "prompts_per_fact": rel.PROMPTS_PER_FACT}),
        operation=Operation(op="clamp", value=0.0),
        neurons=[Neuron(layer=l, index=i, score=s) for l, i, s in top],
        provenance=Provenance(
            data_file="../shared/data/pararel (yanaiela/pararel)", examples=None,
            command=f"kn-steer localize --method relation --relation {r} --count {len(top)} "
                    f"--data ../shared/data/pararel --out neuron_sets/smollm2-135m-relation-{r}.json",
        ),
        metrics={k: v for k, v in (row or {}).items() if k != "acc_others_by_relation"}
        | {"results": "benchmarks/results/relation_pararel.json"},
    )
    ns.save(out)
    log(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = list(dict.fromkeys(r["relation"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(rels), figsize=(3.2 * len(rels), 3.2), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rels):
        rows = [x for x in result["rows"] if x["relation"] == r]
        ns = [x["n"] for x in rows]
        ax.plot(ns, [x["acc_relation"] for x in rows], "o-", label=f"top-N: {r}")
        ax.plot(ns, [x["acc_others"] for x in rows], "s-", label="top-N: other relations")
        ax.plot(ns, [x["random_acc_relation"] for x in rows], "o--", color="grey", label=f"random: {r}")
        ax.set_xscale("log")
        ax.set_title(r)
        ax.set_xlabel("neurons deactivated (N)")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("accuracy (held-out, known)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
