"""Clamp a concept's neurons and count how often the model then talks about it (Davies et al.):
a thin driver of ``kn_steer.localize.vocabulary.find_concept`` (the neurons, from the weights) and
``kn_steer.eval.protocols.concept`` (the counts, against matched random neurons), generating through
the serving path (vLLM with the kn-steer plugin, the clamp in each request's ``kn_steer``).

    python benchmarks/repro_concept.py                          # "dog" on SmolLM2-135M-Instruct
    python benchmarks/repro_concept.py --word cat --values 5,10,20
    python benchmarks/repro_concept.py --from benchmarks/results/concept_dog.json --ship --ship-value 20

Results go to repro-results/concept-<word>.json (+ .png) unless --out says otherwise. ``--from`` reads
a finished result instead of generating again; ``--ship`` writes the set (through the library's
``concept`` method) with the measured counts in its metrics, clamped by default to ``--ship-value``,
which must be one of the measured values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import common
from repro_common import add_common, log, model_title, output_path, set_prefix, setup_threads, ship_path

from kn_steer.fileio import atomic_savefig, atomic_write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--word", default="dog", help="the concept (one token in some spelling)")
    p.add_argument("--words", default=None, help="answer words that count (default: WORD, WORDs, and for dog: puppy)")
    p.add_argument("--top", type=int, default=10, help="neurons kept at most")
    p.add_argument("--max-rank", type=int, default=10, help="a neuron must put the word among its first N tokens")
    p.add_argument("--values", default="5,10,20", help="clamp values")
    p.add_argument("--samples", type=int, default=20, help="answers per question per condition")
    p.add_argument("--seeds", type=int, default=3, help="matched random controls per value")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--from", dest="source", type=Path, default=None, help="a finished result JSON to reuse")
    p.add_argument("--ship", nargs="?", const="", default=None, help="also write the set (default neuron_sets/<model>-concept-<word>.json)")
    p.add_argument("--ship-value", type=float, default=None, help="the shipped set's default clamp value (a measured one)")
    add_common(p)
    return p.parse_args(argv)


def ship(result: dict[str, Any], args: argparse.Namespace, hf: Any, tokenizer: Any, ref: Any) -> None:
    from kn_steer.eval.protocols import concept

    rows = {r["value"]: r for r in result["rows"]}
    if args.ship_value not in rows:
        raise SystemExit(f"--ship-value must be one of the measured values {sorted(rows)}")
    name = f"{set_prefix(ref.name)}-concept-{args.word.lower()}"
    out = ship_path(args.ship, name)
    row = rows[args.ship_value]
    matched = ", ".join(f"{m:.2f}" for m in row["matched"])
    sweep = "; ".join(f"clamp {r['value']:g}: {r['set']:.2f} (matched {max(r['matched']):.2f} at most)"
                      for r in result["rows"])
    description = (
        f"The {len(result['neurons'])} neurons of {model_title(ref.name)} whose write direction through the final norm "
        f"and the LM head most singles out {args.word!r} (concept method, Davies et al.), clamped to "
        f"{args.ship_value:g} by default. Asked {len(result['questions'])} open questions about a favourite animal, "
        f"{result['samples_per_question']} samples each (temperature {result['temperature']}): answers naming "
        f"{args.word} {result['unsteered']:.2f} unsteered -> {row['set']:.2f} (p {row['p_set_vs_unsteered']:.2g}); "
        f"matched random neurons clamped to the same value {matched}. Sweep: {sweep}. The dose was chosen on these "
        "same questions (there is no held-out split for it) by a rule: the smallest measured clamp at which the set "
        "beats unsteered and every matched control at p < 0.01. From clamp 15 up, many answers degenerate into "
        "repeated words (the strongest neuron also promotes 'cat(s)', and the samples repeat 'cat' as often as "
        f"'dog'): see benchmarks/results/concept_{args.word.lower()}.json for samples.")
    metrics = {"concept_clamp": {"questions": len(result["questions"]), "n": result["n"],
                                 "unsteered": result["unsteered"], "rows": result["rows"]}}
    ns = concept.build_set(hf, tokenizer, ref, args.word, args.top, args.max_rank, args.ship_value, out, name=name,
                           description=description, metrics=metrics,
                           command_out=f"neuron_sets/{out.name}" if out.parent.name == "neuron_sets" else None)
    if sorted(map(list, ((n.layer, n.index) for n in ns.neurons))) != sorted(result["neurons"]):
        raise SystemExit("the library's set differs from the measured neurons: rerun without --from")
    print(f"shipped {out}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar([i - 0.2 for i in x], [r["set"] for r in rows], 0.4, color="#c33", label=f"{result['word']} neurons")
    means = [sum(r["matched"]) / len(r["matched"]) for r in rows]
    ax.bar([i + 0.2 for i in x], means, 0.4, color="#39c", label="matched random (mean)")
    for i, r in enumerate(rows):
        ax.scatter([i + 0.2] * len(r["matched"]), r["matched"], color="k", s=10, zorder=3)
    ax.axhline(result["unsteered"], color="#888", lw=1, label="unsteered")
    ax.set_xticks(list(x), [f"clamp {r['value']:g}" for r in rows])
    ax.set_ylabel(f"answers naming {result['word']}")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['model_title']}: {len(result['neurons'])} concept neurons, {result['n']} answers each",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)


def measure(args: argparse.Namespace, argv: list[str] | None, ref: Any, found: list, shape: Any,
            out: Path) -> dict[str, Any]:
    """Generate under every condition through vLLM with the plugin; write the JSON and PNG."""
    from vllm import LLM, SamplingParams

    from kn_steer.eval.protocols import concept

    words = args.words.split(",") if args.words else [args.word, args.word + "s"] + (
        ["puppy", "puppies"] if args.word == "dog" else [])
    for key, value in common.ENGINE_ENV.items():  # a small KV cache: the CPU backend reserves memory up front
        os.environ.setdefault(key, value)
    llm = LLM(model=str(ref.path), dtype="float32", max_model_len=512, seed=0, enforce_eager=True)

    def generate(spec, questions, samples):
        params = SamplingParams(n=samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=0,
                                extra_args={"kn_steer": spec} if spec is not None else None)
        outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outputs]

    values = [float(v) for v in args.values.split(",")]
    neurons = [(n.layer, n.index) for n in found]
    result = concept.run(generate, neurons, shape, values, words, samples=args.samples, seeds=args.seeds)
    result.update({"word": args.word, "model": ref.name, "model_title": model_title(ref.name),
                   "z": [n.z for n in found], "temperature": args.temperature, "max_tokens": args.max_tokens,
                   "command": "python benchmarks/repro_concept.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"unsteered: {result['unsteered']:.3f} of {result['n']} answers name {args.word}")
    for r in result["rows"]:
        print(f"clamp {r['value']:g}: set {r['set']:.3f} (p {r['p_set_vs_unsteered']:.2g}); matched "
              + ", ".join(f"{m:.3f}" for m in r["matched"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    out = None if args.source is not None else output_path(args, f"concept-{args.word}")
    from kn_steer.localize.vocabulary import find_concept
    from kn_steer.models import load_hf_model, resolve_model
    from kn_steer.models.families import ModelShape

    ref = resolve_model(args.model)
    hf, tokenizer = load_hf_model(ref)
    found = find_concept(hf, tokenizer, args.word, "write", args.top, args.max_rank)
    if not found:
        raise SystemExit(f"no neuron puts {args.word!r} among its first {args.max_rank} tokens")
    neurons = [(n.layer, n.index) for n in found]
    shape = ModelShape.from_config(hf.config)
    log(f"{len(neurons)} {args.word} neurons: {neurons}")
    if args.source is not None:
        import json

        result = json.loads(args.source.read_text())
        if result["word"] != args.word or sorted(result["neurons"]) != sorted(map(list, neurons)):
            raise SystemExit(f"{args.source} was measured for other neurons or another word")
    else:
        result = measure(args, argv, ref, found, shape, out)
    if args.ship is not None:
        if args.ship_value is None:
            raise SystemExit("--ship needs --ship-value (one of the measured clamp values)")
        ship(result, args, hf, tokenizer, ref)
    return result


if __name__ == "__main__":
    main()
