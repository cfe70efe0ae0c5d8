"""Language-specific neurons (LAPE, Tang et al. 2024): a thin driver of the ``language`` corpus
method (activation probabilities on PUD's train split, every language) and
``kn_steer.eval.protocols.language`` (deactivating each language's neurons, perplexity on the
held-out sentences of every evaluated language, against matched random neurons), on each model.

    python benchmarks/repro_language.py                           # both models
    python benchmarks/repro_language.py --models gemma3-270m --ship gemma3-270m:fr,de

Results go to repro-results/language.json (+ .png per model) unless --out says otherwise, rewritten
after each model; sets are written only with --ship MODEL:LANG,LANG
(neuron_sets/<model>-language-<lang>.json), and only for a language whose set passes :func:`specific`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from repro_common import (
    SHIPPED,
    add_common,
    data_dir,
    display_path,
    log,
    model_title,
    output_path,
    set_prefix,
    setup_threads,
)

from kn_steer.fileio import atomic_write_json

EVAL_LANGUAGES = "en,fr,es,ru,zh,ja"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--data", type=Path, default=None, help="parallel folder (default ../shared/data/pud)")
    p.add_argument("--languages", default="all", help="languages the selection compares (default: every file)")
    p.add_argument("--eval-languages", default=EVAL_LANGUAGES, help="matrix rows and columns")
    p.add_argument("--train", type=int, default=200, help="first N aligned sentences localize; the rest is held out")
    p.add_argument("--test", type=int, default=50, help="held-out sentences evaluated per language")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seeds", type=int, default=2, help="matched random sets per language")
    p.add_argument("--ship", nargs="*", default=[], metavar="MODEL:LANGS", help="write these languages' sets")
    add_common(p)
    args = p.parse_args(argv)
    if args.model != "smollm2-135m":
        raise SystemExit("use --models (comma-separated) with this driver")
    return args


def description(lang: str, row: dict[str, Any], result: dict[str, Any], title: str) -> str:
    others = [v for e, v in row["set"].items() if e != lang]
    control = [m[lang] for m in row["matched"]]
    return (f"The {row['neurons']} {lang} neurons of {title} by activation-probability entropy (LAPE, Tang et al. "
            f"2024) over {len(result['selection']['languages'])} PUD languages (the first {result['train']} sentences). "
            f"Deactivated (clamp 0) on {result['protocol']['sentences']} held-out sentences: {lang} log-perplexity "
            f"{row['set'][lang]:+.3f} nats/token, the other evaluated languages {sum(others) / len(others):+.3f} on "
            f"average (max {max(others):+.3f}); matched random neurons on {lang} "
            + ", ".join(f"{c:+.3f}" for c in control) + ".")


def specific(lang: str, row: dict[str, Any]) -> bool:
    """The rule, fixed before the run, for shipping a language's set: deactivating it hurts its own
    language most, and at least twice as much as every matched random set does."""
    own = row["set"][lang]
    return own == max(row["set"].values()) and all(own > 2 * max(m[lang], 0.0) for m in row["matched"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    out = output_path(args, "language")
    from kn_steer.data.parallel import ParallelText, load_parallel
    from kn_steer.eval.protocols import language as protocol
    from kn_steer.localize.methods import Context
    from kn_steer.localize.methods.language import LANGUAGE, activation_probabilities, lape_sets
    from kn_steer.models import load_hf_model, resolve_model

    folder = args.data or data_dir() / "pud"
    ships = {m: langs.split(",") for m, langs in (s.split(":", 1) for s in args.ship)}
    evaluated = args.eval_languages.split(",")
    models: list[dict[str, Any]] = []
    command = "python benchmarks/repro_language.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def summary(done: list[dict[str, Any]]) -> dict[str, Any]:
        return {"benchmark": "language-neurons", "data": display_path(folder), "models": done, "command": command}

    for name in args.models.split(","):
        ref = resolve_model(name)
        model, tokenizer = load_hf_model(ref)
        params = LANGUAGE.parse_params({"language": evaluated[0], "languages": args.languages, "train": args.train,
                                        "max_tokens": args.max_tokens})
        corpus = LANGUAGE.load(folder, "parallel", params)
        log(f"{ref.name}: activation probabilities over {len(corpus.prompts)} sentences")
        probabilities = activation_probabilities(Context(model, tokenizer, progress=True), corpus, params)
        languages, probs, tokens = probabilities
        sets, info = lape_sets(probs, languages, params.filter_quantile, params.entropy_fraction)
        layers = Counter(l for members in sets.values() for l, _, _ in members)
        log(f"{ref.name}: " + ", ".join(f"{lang} {len(s)}" for lang, s in sets.items()))
        held = load_parallel(folder, evaluated).split(args.train, "test")
        test = ParallelText(held.ids[:args.test], {k: v[:args.test] for k, v in held.texts.items()})
        table = protocol.run(model, tokenizer, test, {l: [(a, b) for a, b, _ in sets[l]] for l in evaluated},
                             evaluated, seeds=args.seeds, max_tokens=args.max_tokens)
        entry = {"model": ref.name, "model_title": model_title(ref.name), "train": args.train,
                 "params": params.model_dump(exclude={"language"}),
                 "selection": {**info, "languages": languages, "tokens": tokens,
                               "per_language": {l: len(s) for l, s in sets.items()},
                               "layers": {str(k): v for k, v in sorted(layers.items())},
                               "sets": {l: [[a, b] for a, b, _ in s] for l, s in sets.items()}},
                 "protocol": table}
        models.append(entry)
        protocol.matrix_plot(table, f"{model_title(ref.name)}: deactivating language neurons (LAPE)",
                             out.with_name(f"{out.stem}-{set_prefix(ref.name)}.png"))
        for lang in ships.get(ref.name, []):
            row = table["matrix"].get(lang)
            if row is None:
                raise SystemExit(f"--ship {ref.name}:{lang}: not an evaluated language with neurons")
            if not specific(lang, row):
                log(f"not shipped: {ref.name} {lang} (its own language is not hit most, or a control hits it as hard)")
                continue
            target = SHIPPED / f"{set_prefix(ref.name)}-language-{lang}.json"
            mine = LANGUAGE.parse_params({**params.model_dump(), "language": lang})
            ns = protocol.build_set(model, tokenizer, ref, folder, mine, probabilities, target, name=target.stem,
                                    description=description(lang, row, entry, model_title(ref.name)),
                                    metrics={"deactivation": row, "results": display_path(out)},
                                    command_data=display_path(folder), command_out=display_path(target))
            if [(n.layer, n.index) for n in ns.neurons] != [(a, b) for a, b, _ in sets[lang]]:
                raise SystemExit(f"{target}: the method's set differs from the evaluated neurons")
            log(f"wrote {target}")
        atomic_write_json(out, summary(models))  # a finished model is never lost to a later one's failure
        del model
    result = summary(models)
    atomic_write_json(out, result)
    for m in models:
        s = m["protocol"]["summary"]
        print(f"{m['model']}: per language {m['selection']['per_language']}; layers {m['selection']['layers']}")
        print(f"  diagonal {s['diagonal_mean']:+.3f}, off-diagonal {s['off_diagonal_mean']:+.3f}, matched diagonal "
              f"{s['matched_diagonal_mean']:+.3f}; own language hit most in {s['rows_whose_own_language_is_hit_most']}"
              f"/{s['rows']} rows")
        for lang, row in m["protocol"]["matrix"].items():
            print(f"  {lang} ({row['neurons']:3d}): " + " ".join(f"{e} {v:+.3f}" for e, v in row["set"].items())
                  + f" | matched on {lang} " + " ".join(f"{c[lang]:+.3f}" for c in row["matched"]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
