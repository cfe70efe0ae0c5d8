"""Steering the output language with LAPE neurons, through the serving path (vLLM with the kn-steer
plugin, each clamp in the request's ``kn_steer`` field): a thin driver of
``kn_steer.eval.protocols.language_steering``. The sets come from a ``repro_language.py`` result;
each neuron's mean activation on its language is read on the same train sentences.

    python benchmarks/repro_language_steering.py --from benchmarks/results/language.json

Results go to repro-results/language_steering.json (+ .png) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import common
from repro_common import add_common, data_dir, display_path, log, model_title, output_path, setup_threads

from kn_steer.fileio import atomic_savefig, atomic_write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", type=Path, required=True, help="a repro_language.py result")
    p.add_argument("--data", type=Path, default=None, help="parallel folder (default ../shared/data/pud)")
    p.add_argument("--languages", default="ru,zh,ja,ar,hi", help="languages steered (each needs a script rule)")
    p.add_argument("--doses", default="1,2,4", help="multiples of each neuron's mean activation on the language")
    p.add_argument("--prompts", type=int, default=40, help="English held-out sentence openings")
    p.add_argument("--first", type=int, default=300, help="index of the first prompt sentence (after the train split)")
    p.add_argument("--words", type=int, default=6, help="words of each sentence kept as the prompt")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seeds", type=int, default=1, help="matched random sets per language and dose")
    add_common(p)
    args = p.parse_args(argv)
    return args


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = result["languages"]
    fig, axes = plt.subplots(1, len(langs), figsize=(3.2 * len(langs), 3.4), squeeze=False, sharey=True)
    for ax, (lang, row) in zip(axes[0], langs.items()):
        doses = [d["dose"] for d in row["doses"]]
        ax.plot(doses, [d["set"] for d in row["doses"]], "o-", color="#c33", label=f"{row['neurons']} {lang} neurons")
        ax.plot(doses, [max(d["matched"]) for d in row["doses"]], "s--", color="#39c", label="matched random")
        ax.axhline(row["unsteered"], color="gray", lw=1, label="unsteered")
        ax.set_xscale("log", base=2)
        ax.set_title(lang)
        ax.set_xlabel("dose (x mean activation)")
    axes[0][0].set_ylabel(f"continuations in the language (of {result['n']})")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['model_title']}: activating language neurons")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    out = output_path(args, "language_steering")
    from kn_steer.data.parallel import load_parallel
    from kn_steer.eval.protocols import language_steering
    from kn_steer.localize.recorder import mean_activations
    from kn_steer.models import load_hf_model, resolve_model
    from kn_steer.models.families import ModelShape

    source = json.loads(args.source.read_text())
    entry = next((m for m in source["models"] if m["model"] == args.model), None)
    if entry is None:
        raise SystemExit(f"{args.source} has no result for {args.model}")
    sets = {lang: [tuple(p) for p in entry["selection"]["sets"][lang]] for lang in args.languages.split(",")
            if entry["selection"]["sets"].get(lang)}
    folder = args.data or data_dir() / "pud"
    train = entry["train"]
    if args.first < train:
        raise SystemExit(f"--first {args.first}: the prompts must come after the {train} train sentences")
    text = load_parallel(folder, ["en", *sets])
    prompts = [" ".join(s.split()[:args.words]) for s in text.texts["en"][args.first:args.first + args.prompts]]
    ref = resolve_model(args.model)
    hf, tokenizer = load_hf_model(ref)
    shape = ModelShape.from_config(hf.config)
    layers = list(range(shape.num_layers))
    means = {}
    for lang in sets:
        log(f"mean activations on {lang} ({train} train sentences)")
        means[lang] = mean_activations(hf, tokenizer, text.texts[lang][:train], layers, entry["params"]["max_tokens"])
    del hf
    from vllm import LLM, SamplingParams

    for key, value in common.ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["KN_STEER_MAX_INTERVENTIONS"] = "1024"  # one clamp per neuron, each at its own value
    llm = LLM(model=str(ref.path), dtype="float32", max_model_len=512, seed=0, enforce_eager=True)

    def generate(spec, batch):
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                extra_args={"kn_steer": spec} if spec is not None else None)
        return [o.outputs[0].text for o in llm.generate(list(batch), params, use_tqdm=False)]

    doses = [float(d) for d in args.doses.split(",")]
    result = language_steering.run(generate, prompts, sets, means, shape, doses, seeds=args.seeds)
    result.update({"model": ref.name, "model_title": model_title(ref.name), "sets_from": display_path(args.source),
                   "max_tokens": args.max_tokens,
                   "command": "python benchmarks/repro_language_steering.py "
                              + " ".join(argv if argv is not None else sys.argv[1:])})
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for lang, row in result["languages"].items():
        print(f"{lang} ({row['neurons']} neurons): unsteered {row['unsteered']:.2f}; " + "; ".join(
            f"x{d['dose']:g}: set {d['set']:.2f} (p {d['p_set_vs_unsteered']:.2g}), matched "
            + ", ".join(f"{m:.2f}" for m in d["matched"]) for d in row["doses"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
