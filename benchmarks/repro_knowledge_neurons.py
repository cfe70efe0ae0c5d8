"""Knowledge neurons (Dai et al. 2022) on PARAREL with SmolLM2-135M-Instruct: the paper's table.

1. Facts the model knows: over a few relations, facts in a stable hashed order, each with up to
   ``--paraphrases`` prompts (patterns ending in [Y]); a fact is *known* when the greedy next token
   equals the first token of the object for at least half of its prompts (batched forwards).
2. Per known fact, the ``kn`` method of kn_steer.localize (integrated gradients of P(first target
   token) for every neuron of every layer, zero baseline, ``--steps`` m; coarse threshold 0.2 x max
   per prompt; refinement: neurons found in more than half of the fact's prompts). Per-fact
   results are checkpointed (kn_steer.localize.runner.Checkpoint): an interrupted run resumes.
3. Per fact with at least one refined neuron: the relative change of P(correct first token),
   averaged over its prompts, when its neurons are scaled x0 (suppress) and x2 (enhance)
   (kn_steer.spec.compile_spec with the neurons given explicitly, kn_steer.reference.steer), and
   the same with as many random neurons drawn with the same layer distribution (for each refined
   neuron, a random neuron of the same layer).

    .venv/bin/python benchmarks/repro_knowledge_neurons.py --facts 200 --steps 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
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
from kn_steer.localize.examples import KNExample  # noqa: E402
from kn_steer.localize.methods import Context, get_method  # noqa: E402
from kn_steer.localize.relation import score_prompts  # noqa: E402
from kn_steer.localize.runner import Checkpoint, _header, example_hash  # noqa: E402
from kn_steer.models import cache_dir, load_hf_model, resolve_model  # noqa: E402
from kn_steer.models.families import ModelShape  # noqa: E402
from kn_steer.steering.compile import compile_spec  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pararel"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def candidate_examples(relations: dict, wanted: list[str], paraphrases: int, scan: int) -> list[KNExample]:
    """Up to ``scan`` facts per relation, hashed order, each with its first ``paraphrases`` prompts
    taken cyclically from the usable patterns (so every pattern appears)."""
    out = []
    for rid in wanted:
        r = relations[rid]
        facts = sorted(r.facts, key=lambda f: hashlib.sha256(f"kn:{rid}:{f.uuid or f.subject}".encode()).digest())
        prefixes = r.prefixes
        for k, fact in enumerate(facts[:scan]):
            ex = r.prompts_for(fact)
            n = min(paraphrases, len(prefixes))
            prompts = [ex.prompts[(k + j) % len(prefixes)] for j in range(n)]
            out.append(KNExample(id=ex.key, prompts=prompts, target=ex.target,
                                 meta={"relation": rid, "subject": fact.subject}))
    return out


class Cache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any, flush: bool = True) -> None:
        self.data[key] = value
        if flush:
            atomic_write_json(self.path, self.data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--relations", nargs="+", default=["P36", "P1376", "P30", "P103", "P27", "P407", "P37", "P140"])
    ap.add_argument("--facts", type=int, default=200, help="known facts to localize (spread over relations)")
    ap.add_argument("--paraphrases", type=int, default=3)
    ap.add_argument("--scan", type=int, default=400, help="facts screened per relation")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--first-order", action="store_true", help="gradient x activation (approximation)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop localizing new facts after this many seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seeds", type=int, default=3, help="random controls per fact")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kn_pararel.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    shape = ModelShape.from_config(model.config)
    work = cache_dir() / "bench" / "kn" / ref.fingerprint.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache(work / "known_and_effects.json")

    # 1. known facts (screening cached per fact)
    relations = load_pararel(args.data, args.relations)
    candidates = candidate_examples(relations, args.relations, args.paraphrases, args.scan)
    todo = [ex for ex in candidates if cache.get(f"known/{ex.id}") is None]
    if todo:
        prompts = [p for ex in todo for p in ex.prompts]
        targets = [ex.target for ex in todo for _ in ex.prompts]
        log(f"screening {len(todo)} facts ({len(prompts)} prompts)")
        correct = score_prompts(model, tok, prompts, targets).correct.tolist()
        k = 0
        for ex in todo:
            n = len(ex.prompts)
            cache.put(f"known/{ex.id}", correct[k:k + n], flush=False)
            k += n
        cache.put("screened", len(candidates))
    known_by_rel: dict[str, list[KNExample]] = {r: [] for r in args.relations}
    for ex in candidates:
        hits = cache.get(f"known/{ex.id}")
        if sum(hits) * 2 >= len(hits):
            known_by_rel[ex.meta["relation"]].append(ex)
    # round-robin over relations so the first facts cover every relation
    known: list[KNExample] = []
    while len(known) < args.facts and any(known_by_rel.values()):
        for r in args.relations:
            if known_by_rel[r] and len(known) < args.facts:
                known.append(known_by_rel[r].pop(0))
    screened = {r: sum(1 for ex in candidates if ex.meta["relation"] == r) for r in args.relations}
    log(f"{len(known)} known facts selected")

    # 2. knowledge neurons per fact (resumable)
    spec = get_method("kn")
    params = spec.parse_params({"steps": args.steps, "first_order": args.first_order or None})
    checkpoint = Checkpoint(work / f"kn_facts_m{args.steps}{'_fo' if args.first_order else ''}.jsonl",
                            _header(spec, params, ref.fingerprint))
    ctx = Context(model=model, tokenizer=tok)
    done: list[tuple[KNExample, Any]] = []
    for i, ex in enumerate(known):
        digest = example_hash(ex)
        result = checkpoint.get(ex.id, digest)
        if result is None:
            if args.budget_s is not None and time.time() - started > args.budget_s:
                log(f"budget reached after {len(done)} facts")
                break
            t0 = time.time()
            result = spec.score_example(ctx, ex, params)
            checkpoint.add(ex.id, digest, result)
            log(f"fact {i + 1}/{len(known)} {ex.id}: {len(result.neurons)} refined neurons ({time.time() - t0:.1f}s)")
        done.append((ex, result))

    # 3. suppress / enhance vs random (same layer distribution)
    def probs(ex: KNExample, neurons: list[tuple[int, int]], factor: float | None) -> list[float]:
        if factor is None:
            return score_prompts(model, tok, ex.prompts, [ex.target] * len(ex.prompts)).prob.tolist()
        spec_ = {"interventions": [{"neurons": [list(p) for p in neurons], "op": "scale", "factor": factor}]}
        compiled = compile_spec(spec_, {}, shape)
        return score_prompts(model, tok, ex.prompts, [ex.target] * len(ex.prompts), compiled).prob.tolist()

    per_fact = []
    for ex, result in done:
        neurons = [(n.layer, n.index) for n in result.neurons]
        if not neurons:
            continue
        key = f"effect/{ex.id}/{example_hash(ex)}/{len(neurons)}/{args.seeds}"
        eff = cache.get(key)
        if eff is None:
            base = probs(ex, [], None)
            eff = {"base": base}
            for name, factor in (("suppress", 0.0), ("enhance", 2.0)):
                eff[name] = probs(ex, neurons, factor)
                eff[f"random_{name}"] = []
                for seed in range(args.seeds):
                    rng = random.Random(f"{ex.id}:{seed}")
                    taken = set(neurons)
                    rand = []
                    for layer, _ in neurons:
                        while True:
                            pick = (layer, rng.randrange(shape.intermediate_size))
                            if pick not in taken:
                                taken.add(pick)
                                rand.append(pick)
                                break
                    eff[f"random_{name}"].append(probs(ex, rand, factor))
            cache.put(key, eff)

        def rel_change(after: list[float]) -> float:
            return statistics.mean((a - b) / b for a, b in zip(after, eff["base"]))

        per_fact.append({
            "id": ex.id, "relation": ex.meta["relation"], "neurons": len(neurons),
            "layers": sorted({l for l, _ in neurons}),
            "suppress": rel_change(eff["suppress"]), "enhance": rel_change(eff["enhance"]),
            "random_suppress": statistics.mean(rel_change(x) for x in eff["random_suppress"]),
            "random_enhance": statistics.mean(rel_change(x) for x in eff["random_enhance"]),
            "base_prob": statistics.mean(eff["base"]),
        })

    def summary(rows: list[dict]) -> dict:
        out = {"facts": len(rows)}
        if rows:
            out["mean_neurons"] = statistics.mean(r["neurons"] for r in rows)
        for k in ("suppress", "enhance", "random_suppress", "random_enhance"):
            if rows:
                out[k] = statistics.mean(r[k] for r in rows)
                out[k + "_median"] = statistics.median(r[k] for r in rows)
        return out

    layer_hist: dict[int, int] = {}
    for ex, result in done:
        for n in result.neurons:
            layer_hist[n.layer] = layer_hist.get(n.layer, 0) + 1
    result = {
        "model": ref.name, "fingerprint": ref.fingerprint,
        "setup": {
            "known": f"greedy first token correct for at least half of the fact's prompts "
                     f"(up to {args.paraphrases} paraphrases each)",
            "method": f"kn (kn_steer.localize.methods): IG m={args.steps}"
                      f"{' FIRST-ORDER approximation' if args.first_order else ''}, threshold 0.2 x max, "
                      "refinement p=0.5 over the fact's paraphrases",
            "effect": "relative change of P(first target token), mean over the fact's prompts, then over facts; "
                      "facts with no refined neuron are left out",
            "random": f"same count, same layer distribution, {args.seeds} seeds per fact",
        },
        "screened_facts": screened, "known_facts": {r: sum(1 for ex in known if ex.meta['relation'] == r) for r in args.relations},
        "localized_facts": len(done),
        "facts_without_neurons": sum(1 for _, r in done if not r.neurons),
        "overall": summary(per_fact),
        "by_relation": {r: summary([x for x in per_fact if x["relation"] == r]) for r in args.relations},
        "neurons_per_layer": dict(sorted(layer_hist.items())),
        "per_fact": per_fact, "seconds": round(time.time() - started, 1),
        "command": "python benchmarks/repro_knowledge_neurons.py " + " ".join(sys.argv[1:]),
    }
    atomic_write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out}: {json.dumps(result['overall'])}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = result["overall"]
    if not o.get("facts"):
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, kind in zip(axes, ("suppress", "enhance")):
        vals = [100 * o[kind], 100 * o[f"random_{kind}"]]
        ax.bar(["knowledge neurons", "random neurons"], vals, color=["tab:blue", "grey"])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{kind} ({'x0' if kind == 'suppress' else 'x2'}), {o['facts']} facts")
        ax.set_ylabel("mean relative change of P(answer) (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
