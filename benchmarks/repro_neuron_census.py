"""Dead, token-detector and positional neurons (Voita et al.) on each model: a thin driver of
``kn_steer.eval.protocols.neuron_census`` over UD EWT paragraphs.

    python benchmarks/repro_neuron_census.py                       # both models, every EWT paragraph
    python benchmarks/repro_neuron_census.py --models smollm2-135m --texts 200

Results go to repro-results/neuron_census.json (+ one PNG per model) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from repro_common import add_common, data_dir, display_path, log, model_title, output_path, set_prefix, setup_threads

from kn_steer.fileio import atomic_write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--text", default=None, help="JSONL with 'text' (default ../shared/data/english/ewt_paragraphs.jsonl)")
    p.add_argument("--texts", type=int, default=1604, help="paragraphs read (EWT has 1,604)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-types", type=int, default=300, help="most frequent token types a detector may detect")
    add_common(p)
    args = p.parse_args(argv)
    if args.model != "smollm2-135m":
        raise SystemExit("use --models (comma-separated) with this driver")
    setup_threads(args.threads)
    out = output_path(args, "neuron_census")
    from kn_steer.data.text import load_texts
    from kn_steer.eval.protocols import neuron_census
    from kn_steer.models import load_hf_model, resolve_model

    source = args.text or data_dir() / "english" / "ewt_paragraphs.jsonl"
    texts = [t.text for t in load_texts(source, args.texts)]
    models = []
    for name in args.models.split(","):
        ref = resolve_model(name)
        model, tokenizer = load_hf_model(ref)
        log(f"{ref.name}: census over {len(texts)} texts")
        counts = neuron_census.census_counts(model, tokenizer, texts, args.max_tokens, args.top_types)
        result = {"model": ref.name, "model_title": model_title(ref.name),
                  **neuron_census.analyse(model, tokenizer, counts)}
        models.append(result)
        neuron_census.plot(result, f"{model_title(ref.name)}: neuron census on {len(texts)} EWT paragraphs",
                           out.with_name(f"{out.stem}-{set_prefix(ref.name)}.png"))
        del model
    result = {"benchmark": "neuron-census", "text": display_path(source), "texts": len(texts),
              "max_tokens": args.max_tokens, "models": models,
              "command": "python benchmarks/repro_neuron_census.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(out, result)
    for m in models:
        r = m["removal"]
        print(f"{m['model']}: {m['tokens']} tokens; dead {m['dead']} of {m['neurons']}, detectors {m['detectors']}, "
              f"positional {m['positional']}")
        print("  dead by layer " + " ".join(f"{v:.3f}" for v in m["dead_by_layer"]))
        print("  detectors by layer " + " ".join(f"{v:.3f}" for v in m["detector_by_layer"]))
        print("  positional by layer " + " ".join(f"{v:.3f}" for v in m["positional_by_layer"]))
        if r:
            print(f"  removal: mean z {r['mean_z']:+.2f} ({r['negative_share']:.2f} negative) vs random "
                  f"{r['control_mean_z']:+.2f} ({r['control_negative_share']:.2f}); p {r['p_vs_control']:.2g}")
        for e in m["detector_examples"][:10]:
            print(f"    ({e['layer']}, {e['index']}) {e['token']!r} share {e['share']} fires {e['fires']} z {e['removal_z']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
