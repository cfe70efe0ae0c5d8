"""Entropy neurons (Stolfo et al.): a thin driver of the ``entropy`` weights method (the set) and
``kn_steer.eval.protocols.entropy`` (ablating it against matched random neurons, on English text),
on each model.

    python benchmarks/repro_entropy.py                                # both models, 100 EWT paragraphs
    python benchmarks/repro_entropy.py --models smollm2-135m --top 20

Results go to repro-results/entropy.json (+ .png) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, log, model_title, output_path, setup_threads

from kn_steer.fileio import atomic_savefig, atomic_write_json


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        keys = ["abs_d_entropy", "abs_d_loss"]
        mine = [m["set"][k] for k in keys]
        ctrl = [m["matched_summary"][k]["mean"] for k in keys]
        sd = [m["matched_summary"][k]["sd"] for k in keys]
        ax.bar([0 - 0.2, 1 - 0.2], mine, 0.4, color="#c33", label=f"{len(m['neurons'])} entropy neurons")
        ax.bar([0 + 0.2, 1 + 0.2], ctrl, 0.4, yerr=sd, capsize=3, color="#39c", label="matched random")
        ax.set_xticks([0, 1], ["|d entropy| (nats)", "|d loss| (nats)"])
        ax.set_title(f"{m['model_title']}: {m['ablation']}-ablated, layer {m['layer']}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--text", type=Path, default=None, help="JSONL with 'text' (default ../shared/data/english/ewt_paragraphs.jsonl)")
    p.add_argument("--texts", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--null-dims", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ablation", choices=["mean", "zero"], default="mean", help="clamp to each neuron's mean, or to 0")
    add_common(p)
    args = p.parse_args(argv)
    if "," in args.model or args.model != "smollm2-135m":
        raise SystemExit("use --models (comma-separated) with this driver")
    setup_threads(args.threads)
    out = output_path(args, "entropy")
    from kn_steer.data.text import load_texts
    from kn_steer.eval.protocols import entropy
    from kn_steer.localize.methods import Context, get_method
    from kn_steer.models import load_hf_model, resolve_model

    text = args.text or data_dir() / "english" / "ewt_paragraphs.jsonl"
    texts = [t.text for t in load_texts(text, args.texts)]
    method = get_method("entropy")
    models = []
    for name in args.models.split(","):
        ref = resolve_model(name)
        model, tokenizer = load_hf_model(ref)
        params = method.parse_params({"top": args.top, "null_dims": args.null_dims})
        selection = method.select(Context(model, tokenizer), params)
        neurons = [(n.layer, n.index) for n in selection.neurons]
        log(f"{ref.name}: entropy neurons {neurons}")
        table = entropy.run(model, tokenizer, texts, neurons, args.ablation, seeds=args.seeds,
                            max_tokens=args.max_tokens)
        models.append({"model": ref.name, "model_title": model_title(ref.name), "params": params.model_dump(),
                       "layer": selection.metrics["layer"], "selection_metrics": selection.metrics, **table})
        del model
    result = {"benchmark": "entropy-neurons", "text": str(text), "models": models,
              "command": "python benchmarks/repro_entropy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for m in models:
        s, c = m["set"], m["matched_summary"]
        print(f"{m['model']}: unsteered H {m['unsteered']['entropy']:.3f} L {m['unsteered']['loss']:.3f}; "
              f"set |dH| {s['abs_d_entropy']:.4f} |dL| {s['abs_d_loss']:.4f} (ratio {s['ratio']:.2f}, dH {s['d_entropy']:+.4f} "
              f"p {s['p_entropy']:.2g}, dL {s['d_loss']:+.4f} p {s['p_loss']:.2g}); matched |dH| "
              f"{c['abs_d_entropy']['mean']:.4f} ± {c['abs_d_entropy']['sd']:.4f}, |dL| {c['abs_d_loss']['mean']:.4f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
