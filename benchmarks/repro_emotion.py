"""Emotion-concept attribute neurons (Li et al.): a thin driver of the ``emotion`` corpus method (27
emotion names in text templates, each neuron's response correlated with 14 human-rated attributes)
and ``kn_steer.eval.protocols.emotion`` (GoEmotions zero-shot inference with each attribute's
neurons deactivated, against matched random neurons), on each model.

    python benchmarks/repro_emotion.py                     # both models
    python benchmarks/repro_emotion.py --models gemma3-270m --items 100 --seeds 1

Results go to repro-results/emotion_attributes.json (+ .png) unless --out says otherwise; the file
is rewritten after each model, and a model already in it is skipped (--fresh starts over). No set
is written: the ratings come without a licence (see ../shared/data/README.md), so sets derived
from them stay out of neuron_sets/; each attribute's ``kn-steer localize emotion`` command is
recorded instead and reproduces it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, display_path, log, model_title, output_path, setup_threads

from kn_steer.fileio import atomic_write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--data", type=Path, default=None, help="emotion folder (default ../shared/data/emotion)")
    p.add_argument("--split", default="test", choices=("dev", "test"), help="GoEmotions split evaluated")
    p.add_argument("--items", type=int, default=200, help="first N single-label comments of the split")
    p.add_argument("--fraction", type=float, default=0.005, help="share of all neurons per attribute set")
    p.add_argument("--seeds", type=int, default=3, help="matched random sets per attribute")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fresh", action="store_true", help="ignore models already in the output file")
    add_common(p)
    args = p.parse_args(argv)
    if args.model != "smollm2-135m":
        raise SystemExit("use --models (comma-separated) with this driver")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    out = output_path(args, "emotion_attributes")
    from kn_steer.data.emotion import inference_items, load_attributes
    from kn_steer.eval.protocols import emotion as protocol
    from kn_steer.localize.command import localize_command, model_argument
    from kn_steer.localize.methods import Context
    from kn_steer.localize.methods.emotion import EMOTION, all_attribute_stats
    from kn_steer.models import load_hf_model, resolve_model

    folder = args.data or data_dir() / "emotion"
    table = load_attributes(folder)
    weights = protocol.importance(table)
    items = inference_items(folder, args.split, table.emotions, args.items)
    done: dict[str, Any] = {}
    if out.exists() and not args.fresh:
        done = {m["model"]: m for m in json.loads(out.read_text())["models"]}
    command = "python benchmarks/repro_emotion.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save() -> dict[str, Any]:
        result = {"benchmark": "emotion-attribute-neurons", "data": display_path(folder), "split": args.split,
                  "importance": weights, "models": list(done.values()), "command": command}
        atomic_write_json(out, result)
        return result

    result: dict[str, Any] = {}
    for name in args.models.split(","):
        ref = resolve_model(name)
        if ref.name in done:
            log(f"{ref.name}: already in {out}, skipped (--fresh reruns it)")
            continue
        model, tokenizer = load_hf_model(ref)
        params = EMOTION.parse_params({"attribute": table.attributes[0], "fraction": args.fraction})
        corpus = EMOTION.load(folder, "emotion", params)
        log(f"{ref.name}: responses to {len(corpus.prompts)} emotion prompts")
        stats = all_attribute_stats(Context(model, tokenizer, progress=True), corpus, params)
        selections, sets = {}, {}
        for attribute, s in stats.items():
            mine = EMOTION.parse_params({**params.model_dump(), "attribute": attribute})
            chosen = EMOTION.select(s, mine)
            sets[attribute] = [(n.layer, n.index) for n in chosen.neurons]
            selections[attribute] = {**chosen.metrics, "neurons": [[n.layer, n.index, n.score] for n in chosen.neurons],
                                     "command": localize_command(EMOTION.name, mine, display_path(folder), "emotion",
                                                                 f"{attribute}.json", model=model_argument(ref))}
        log(f"{ref.name}: {len(items)} {args.split} items x (1 + {len(sets)} x {1 + args.seeds}) conditions")
        measured = protocol.run(model, tokenizer, items, sets, weights, seeds=args.seeds, batch_size=args.batch_size)
        done[ref.name] = {"model": ref.name, "model_title": model_title(ref.name), "params": params.model_dump(
            exclude={"attribute"}), "selection": selections, "overlap": protocol.overlap(sets), "protocol": measured}
        result = save()
        del model
    result = save()
    if done:
        protocol.plot({m["model_title"]: m["protocol"] for m in done.values()}, weights, out.with_suffix(".png"))
    for m in done.values():
        p, s = m["protocol"], m["protocol"]["summary"]
        u = p["unsteered"]
        print(f"{m['model']}: unsteered accuracy {u['accuracy_total']:.3f} (total) / {u['accuracy_calibrated']:.3f} "
              f"(calibrated), gold log-softmax {u['gold_log_softmax']:+.3f}; chance {p['chance_accuracy']:.3f}, "
              f"majority {p['majority_accuracy']:.3f}")
        for attribute, row in p["attributes"].items():
            sel = m["selection"][attribute]
            print(f"  {attribute:16s} |r|>={sel['abs_r_bar']:.2f} (chance {sel['chance_above_bar_mean']:.1f} of "
                  f"{row['neurons']}): drop {row['set_drop']['gold_log_softmax']:+.4f} vs controls "
                  + " ".join(f"{c['gold_log_softmax']:+.4f}" for c in row["control_drops"])
                  + f" p {row.get('p_set_vs_controls', float('nan')):.3g}")
        print(f"  worse than every control: {s['worse_than_every_control']}/{s['attributes']} "
              f"(and p<0.05: {s['worse_and_p_below_0.05']}); importance rho {s.get('importance_spearman_rho')}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
