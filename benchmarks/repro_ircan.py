"""Reproduce IRCAN (Shi et al. 2024) on SmolLM2-135M-Instruct: MemoTrap and COSE_KRE.

1. Localize context-aware neurons on a dev subset: exact integrated gradients of P(first token of
   the context-faithful answer) along the path from the context-free prompt's activations to the
   activations with the context (last prompt token, m steps, every layer; kn_steer.localize.engine).
   Per example keep the top k neurons; the set is the h most frequent across examples.
2. Choose h and beta on a held-out dev subset by a grid (scale the h neurons by beta at every
   position; pick the highest accuracy, ties: lower trap rate, then smaller h and beta).
3. On test: accuracy (context-faithful choice wins) and trap rate (memorised answer wins) for
   unsteered, IRCAN-steered, and h random neurons (uniform over all layers) scaled by the same
   beta, over several seeds (mean +- sd).

Scoring is total log-probability of each choice continuation (kn_steer.eval, transformers
backend). Attributions and every scored condition are cached, so an interrupted run resumes and
a finished one reruns instantly. Results: benchmarks/results/ircan_<dataset>.json and .png;
``--ship`` writes the set to neuron_sets/smollm2-135m-context-<dataset>.json.

    .venv/bin/python benchmarks/repro_ircan.py --dataset memotrap --ship
    .venv/bin/python benchmarks/repro_ircan.py --dataset kre --ship
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_steer.data import ChoiceItem, load_items, shared_data_dir  # noqa: E402
from kn_steer.eval.api import HFEvaluator, summarize  # noqa: E402
from kn_steer.eval.scoring import ItemScore  # noqa: E402
from kn_steer.fileio import atomic_write_json, sha256_file  # noqa: E402
from kn_steer.models import cache_dir  # noqa: E402


@dataclass(frozen=True)
class DatasetConfig:
    format: str
    dev: str
    test: str


DATASETS = {
    "memotrap": DatasetConfig("memotrap", "memotrap/dev.jsonl", "memotrap/test.jsonl"),
    "kre": DatasetConfig("kre", "kre/cose_dev.json", "kre/cose_test.json"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-dir", type=Path, default=shared_data_dir())
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--loc-n", type=int, default=None, help="dev items used for localization (first N)")
    p.add_argument("--grid-n", type=int, default=None, help="dev items after those, for the h/beta grid (default: the rest of dev)")
    p.add_argument("--test-n", type=int, default=None, help="test items (first N; default all)")
    p.add_argument("--steps", type=int, default=20, help="integrated-gradients steps m")
    p.add_argument("--k", type=int, default=20, help="neurons kept per example")
    p.add_argument("--hs", default="5,10,20,40,80", help="grid of neuron counts h")
    p.add_argument("--betas", default="2,4,8", help="grid of factors beta")
    p.add_argument("--seeds", type=int, default=5, help="random-neuron control seeds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--ship", action="store_true", help="write neuron_sets/smollm2-135m-context-<dataset>.json")
    return p.parse_args(argv)


# Localization on the first dev items, the h/beta grid on the rest of dev (None: all), full test.
DEFAULTS = {"memotrap": dict(loc_n=200, grid_n=None, test_n=None), "kre": dict(loc_n=200, grid_n=None, test_n=None)}


class Cache:
    """A JSON file of finished results keyed by a content hash, rewritten atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------ localization


def localize(ev: HFEvaluator, items: list[ChoiceItem], steps: int, cache: Cache, keep: int = 100) -> dict[str, Any]:
    """Per example: the ``keep`` best (flat index, score) pairs; cached by model, item and steps."""
    from tqdm.auto import tqdm

    from kn_steer.localize.engine import attribute_ids

    tok = ev.tokenizer
    width = ev.shape.intermediate_size
    per_example: dict[str, Any] = {}
    seconds: list[float] = []
    for item in tqdm(items, desc="IRCAN attribution", unit="ex"):
        key = key_of("attr", ev.ref.fingerprint, item.prompt, item.question_prompt, item.choices[item.faithful], steps)
        hit = cache.get(key)
        if hit is None:
            start = time.perf_counter()
            att = attribute_ids(
                ev.model,
                tok(item.prompt, add_special_tokens=False)["input_ids"],
                tok(item.choices[item.faithful], add_special_tokens=False)["input_ids"],
                baseline_ids=tok(item.question_prompt, add_special_tokens=False)["input_ids"],
                steps=steps,
            )
            top = torch.topk(att.scores.flatten(), keep)
            hit = {"idx": top.indices.tolist(), "score": [round(float(s), 7) for s in top.values],
                   "objective": att.objective, "seconds": time.perf_counter() - start}
            cache.put(key, hit)
        seconds.append(hit["seconds"])
        per_example[item.id] = hit
    return {"examples": per_example, "seconds_per_example": statistics.mean(seconds), "width": width}


def rank_neurons(loc: dict[str, Any], k: int) -> list[tuple[int, int, int, float]]:
    """(layer, index, count, summed score) sorted by how many examples have it in their top k."""
    width = loc["width"]
    counts: dict[int, int] = {}
    sums: dict[int, float] = {}
    for hit in loc["examples"].values():
        for flat, score in zip(hit["idx"][:k], hit["score"][:k]):
            counts[flat] = counts.get(flat, 0) + 1
            sums[flat] = sums.get(flat, 0.0) + score
    order = sorted(counts, key=lambda f: (-counts[f], -sums[f]))
    return [(f // width, f % width, counts[f], sums[f]) for f in order]


# ------------------------------------------------------------------------------ scoring


def spec_for(neurons: list[tuple[int, int]], beta: float) -> dict[str, Any] | None:
    if not neurons:
        return None
    return {"interventions": [{"neurons": [list(n) for n in neurons], "op": "scale", "factor": beta}]}


def score_cached(ev: HFEvaluator, encoded: list, neurons: list[tuple[int, int]], beta: float,
                 cache: Cache, label: str) -> dict[str, Any]:
    """Summary of one condition; per-item log-probabilities are cached."""
    ids = [e.item.id for e in encoded]
    key = key_of("score", ev.ref.fingerprint, ids, [e.item.prompt for e in encoded], sorted(neurons), beta)
    hit = cache.get(key)
    if hit is None:
        start = time.perf_counter()
        scores = ev.score(encoded, spec_for(neurons, beta), progress=False)
        hit = {"logprobs": [list(s.logprobs) for s in scores], "seconds": time.perf_counter() - start}
        cache.put(key, hit)
    scores = [ItemScore(e.item.id, tuple(lp), e.item.faithful, e.item.trap) for e, lp in zip(encoded, hit["logprobs"])]
    summary = summarize(scores)
    summary["correct"] = [s.correct for s in scores]  # per item, for the paired tests; not written out
    print(f"  {label:<40} acc {summary['accuracy']:.4f}  trap {summary['trap_rate']:.4f}  "
          f"({len(scores)} items, {hit['seconds']:.0f}s)", flush=True)
    return summary


def paired(arm: list[bool], control: list[bool]) -> dict[str, Any]:
    """Exact McNemar test of two conditions on the same items (kn_steer.stats)."""
    from kn_steer.stats import compare_paired_binary

    c = compare_paired_binary(list(zip(arm, control)))
    wins = sum(1 for a, b in zip(arm, control) if a and not b)
    return {"p_value": c.p_value, "items_won": wins, "items_lost": sum(1 for a, b in zip(arm, control) if b and not a)}


def random_neurons(count: int, seed: int, num_layers: int, width: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    flat = rng.sample(range(num_layers * width), count)
    return [(f // width, f % width) for f in flat]


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


# ------------------------------------------------------------------------------ outputs


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = result["test"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["unsteered", f"IRCAN (h={result['chosen']['h']}, β={result['chosen']['beta']})",
              f"random ×{len(test['random']['per_seed'])}"]
    for ax, metric, title in ((axes[0], "accuracy", "accuracy (context-faithful)"),
                              (axes[1], "trap_rate", "trap rate (memorised answer)")):
        vals = [test["unsteered"][metric], test["ircan"][metric], test["random"][metric]["mean"]]
        errs = [0, 0, test["random"][metric]["sd"]]
        ax.bar(labels, vals, yerr=errs, color=["#888", "#c33", "#39c"], capsize=6)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        for x, v in enumerate(vals):
            ax.text(x, v + 0.02, f"{v:.3f}", ha="center")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"IRCAN on {result['dataset']} test ({test['n']} items), {result['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def ship(result: dict[str, Any], ev: HFEvaluator, dev_path: Path, command: str) -> Path:
    from kn_steer.sets.format import (
        MethodInfo,
        Neuron,
        NeuronSet,
        Operation,
        Provenance,
    )

    name = f"smollm2-135m-context-{result['dataset']}"
    t = result["test"]
    ch = result["chosen"]
    description = (
        f"IRCAN context-aware neurons of SmolLM2-135M-Instruct found on {result['dataset']} dev "
        f"({result['config']['loc_n']} examples, m={result['config']['steps']}, top {result['config']['k']} per example, "
        f"h={ch['h']} most frequent); default: scale by {ch['beta']}. Measured on {result['dataset']} test "
        f"({t['n']} items): accuracy {t['unsteered']['accuracy']:.3f} -> {t['ircan']['accuracy']:.3f} "
        f"(random neurons {t['random']['accuracy']['mean']:.3f} ± {t['random']['accuracy']['sd']:.3f}), "
        f"trap rate {t['unsteered']['trap_rate']:.3f} -> {t['ircan']['trap_rate']:.3f} "
        f"(exact McNemar vs unsteered p={t['mcnemar_ircan_vs_unsteered']['p_value']:.2g})."
    )
    ns = NeuronSet(
        name=name, description=description, model=ev.identity,
        method=MethodInfo(name="ircan", params={"steps": result["config"]["steps"], "k": result["config"]["k"],
                                                "h": ch["h"], "target": "first token of the context-faithful answer",
                                                "baseline": "context-free prompt"}),
        operation=Operation(op="scale", factor=ch["beta"]),
        neurons=[Neuron(layer=l, index=i, score=c / result["config"]["loc_n"]) for l, i, c in result["neurons"]],
        provenance=Provenance(data_file=str(dev_path.name), data_sha256=sha256_file(dev_path),
                              examples=result["config"]["loc_n"], command=command),
        metrics={"split": "test", "n": t["n"], "unsteered": t["unsteered"], "steered": t["ircan"],
                 "random": {"accuracy": t["random"]["accuracy"], "trap_rate": t["random"]["trap_rate"],
                            "seeds": len(t["random"]["per_seed"])}},
    )
    return ns.save(ROOT / "neuron_sets" / f"{name}.json")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = DEFAULTS[args.dataset]
    loc_n = args.loc_n if args.loc_n is not None else defaults["loc_n"]
    grid_n = args.grid_n if args.grid_n is not None else defaults["grid_n"]
    test_n = args.test_n if args.test_n is not None else defaults["test_n"]
    ds = DATASETS[args.dataset]
    dev_path, test_path = args.data_dir / ds.dev, args.data_dir / ds.test
    dev = load_items(dev_path, ds.format)
    test = load_items(test_path, ds.format)
    loc_items = dev[:loc_n]
    grid_items = dev[loc_n:] if grid_n is None else dev[loc_n:loc_n + grid_n]
    test_items = test[:test_n] if test_n else test
    hs = [int(h) for h in args.hs.split(",")]
    betas = [float(b) for b in args.betas.split(",")]
    cache = Cache(cache_dir() / "repro" / f"ircan-{args.dataset}.json")
    ev = HFEvaluator(args.model, batch_size=args.batch_size)
    t0 = time.perf_counter()

    print(f"[{args.dataset}] localize on dev[:{loc_n}] (m={args.steps}, k={args.k})", flush=True)
    loc = localize(ev, loc_items, args.steps, cache)
    ranked = rank_neurons(loc, args.k)

    print(f"[{args.dataset}] grid on dev[{loc_n}:{loc_n + len(grid_items)}]", flush=True)
    grid_enc = ev.encode(grid_items)
    grid = [{"h": 0, "beta": 1.0, **score_cached(ev, grid_enc, [], 1.0, cache, "dev unsteered")}]
    for h in hs:
        for beta in betas:
            neurons = [(l, i) for l, i, _, _ in ranked[:h]]
            grid.append({"h": h, "beta": beta, **score_cached(ev, grid_enc, neurons, beta, cache, f"dev h={h} beta={beta}")})
    best = max(grid[1:], key=lambda g: (round(g["accuracy"], 6), -round(g["trap_rate"], 6), -g["h"], -g["beta"]))
    h, beta = best["h"], best["beta"]
    chosen = [(l, i) for l, i, _, _ in ranked[:h]]

    print(f"[{args.dataset}] test ({len(test_items)} items) with h={h}, beta={beta}", flush=True)
    test_enc = ev.encode(test_items)
    unsteered = score_cached(ev, test_enc, [], 1.0, cache, "test unsteered")
    ircan = score_cached(ev, test_enc, chosen, beta, cache, f"test IRCAN h={h} beta={beta}")
    ircan_correct, base_correct = ircan.pop("correct"), unsteered.pop("correct")
    per_seed = []
    for seed in range(args.seeds):
        rnd = random_neurons(h, seed, ev.shape.num_layers, ev.shape.intermediate_size)
        row = score_cached(ev, test_enc, rnd, beta, cache, f"test random seed={seed}")
        row["mcnemar_ircan_vs_this"] = paired(ircan_correct, row.pop("correct"))
        per_seed.append({"seed": seed, **row})
    for g in grid:
        g.pop("correct", None)
    result = {
        "dataset": args.dataset,
        "model": ev.ref.name,
        "model_fingerprint": ev.ref.fingerprint,
        "command": "python benchmarks/repro_ircan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"loc_split": f"dev[:{loc_n}]", "loc_n": len(loc_items), "grid_split": f"dev[{loc_n}:{loc_n + len(grid_items)}]",
                   "grid_n": len(grid_items), "test_split": f"test[:{len(test_items)}]", "steps": args.steps,
                   "k": args.k, "hs": hs, "betas": betas, "seeds": args.seeds, "target": "first token",
                   "scoring": "total log-probability of each choice continuation (transformers, float32)",
                   "random_control": "h neurons uniform over all layers x neurons, same beta"},
        "localization": {"seconds_per_example": loc["seconds_per_example"],
                         "top_neurons": [{"layer": l, "index": i, "count": c} for l, i, c, _ in ranked[:50]]},
        "grid": grid,
        "chosen": {"h": h, "beta": beta, "dev_accuracy": best["accuracy"], "dev_trap_rate": best["trap_rate"]},
        "neurons": [[l, i, c] for l, i, c, _ in ranked[:h]],
        "test": {
            "n": len(test_items),
            "unsteered": unsteered,
            "ircan": ircan,
            "mcnemar_ircan_vs_unsteered": paired(ircan_correct, base_correct),
            "random": {"accuracy": mean_sd([r["accuracy"] for r in per_seed]),
                       "trap_rate": mean_sd([r["trap_rate"] for r in per_seed]), "per_seed": per_seed},
        },
        "wall_seconds_this_run": time.perf_counter() - t0,
    }
    out = args.out_dir / f"ircan_{args.dataset}.json"
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if args.ship:
        path = ship(result, ev, dev_path, result["command"])
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
