"""Residual-stream directions (#17): refusal and truthfulness directions found by difference of
means (``kn-steer localize diff-means``), each against random directions of the same norm, layers
and operation, on data the method never saw.

* Refusal (SmolLM2-135M-Instruct only: Gemma-3-270M is a base model with no chat template, it has
  no refusal behaviour to remove): the direction from the first 128 harmful / harmless *train*
  instructions, its layer chosen on the next 32; measured on the ``val`` files (39 harmful, the
  first ``--harmless`` harmless): refusal rate with the direction ablated at every layer (harmful)
  and added at its layer (harmless).
* Truthfulness (both models): the direction from the first 128 TruthfulQA questions (best answer vs
  an incorrect one), layer chosen on the next 32; measured on ``--questions`` other questions
  (MC1 accuracy and the true answer's log-softmax over the choices) with it added at its layer.

    python benchmarks/repro_directions.py                 # both models, 5 random directions each
    python benchmarks/repro_directions.py --models smollm2-135m --seeds 3

Results go to repro-results/directions.json (+ .png) unless --out says otherwise; the file is
rewritten after each model, and a model already in it is skipped (--fresh starts over). No set is
shipped: the harmless side of the refusal data is CC BY-NC; each direction's ``kn-steer localize``
command is recorded and reproduces it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, display_path, log, model_title, output_path, publish, pyplot, setup_threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--seeds", type=int, default=5, help="random directions per condition")
    p.add_argument("--harmless", type=int, default=64, help="harmless val instructions measured")
    p.add_argument("--questions", type=int, default=200, help="held-out TruthfulQA questions measured")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--alphas", default="1,2,4", help="doses of the added refusal direction (every one reported)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fresh", action="store_true", help="ignore models already in the output file")
    p.add_argument("--parts", default="refusal,truthfulness", help="which measurements to run")
    add_common(p)
    args = p.parse_args(argv)
    if args.model != "smollm2-135m":
        raise SystemExit("use --models (comma-separated) with this driver")
    return args


def find_direction(model: Any, tokenizer: Any, ref: Any, folder: Path, format: str, chat: bool) -> dict[str, Any]:
    """The library's diff-means method (load, accumulate, select), and the command that reproduces it."""
    from kn_steer.localize.command import localize_command, model_argument
    from kn_steer.localize.methods import Context
    from kn_steer.localize.methods.diff_means import DIFF_MEANS

    params = DIFF_MEANS.parse_params({"op": "add", "chat": chat})
    corpus = DIFF_MEANS.load(folder, format, params)
    chosen = DIFF_MEANS.select(DIFF_MEANS.accumulate(Context(model, tokenizer, progress=True), corpus, params), params)
    (direction,) = chosen.directions
    return {"params": params.model_dump(), "layer": direction.layer, "vector": direction.vector,
            "metrics": chosen.metrics, "questions": [t.split("\n")[0][3:] for t in corpus.prompts],
            "command": localize_command(DIFF_MEANS.name, params, display_path(folder), format, f"{format}.json",
                                        model=model_argument(ref))}


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = [(m["model_title"], kind, m[kind]) for m in result["models"] for kind in ("refusal", "truthfulness")
            if m.get(kind)]
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows) + (1 if any(k == "refusal" for _, k, _ in rows) else 0),
                             figsize=(4.2 * (len(rows) + 1), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    k = 0
    for title, kind, r in rows:
        if kind == "refusal":
            panels = [("ablated (harmful)", "harmful", {"ablated": r["ablate_on_harmful"]}),
                      ("added (harmless)", "harmless", {f"alpha {a}": c for a, c in r["add_on_harmless"].items()})]
            for what, base, cells in panels:
                ax = axes[k]
                k += 1
                names = ["unsteered", *cells]
                ax.bar(names, [r["unsteered"][base], *(c["value"] for c in cells.values())], color=["#999"] + ["#c33"] * len(cells))
                for name, cell in cells.items():
                    ax.scatter([name] * len(cell["controls"]), cell["controls"], color="k", zorder=3, s=12)
                ax.set_ylim(0, 1)
                ax.set_title(f"{title}\nrefusal rate, direction {what} (dots: random)", fontsize=9)
        else:
            ax = axes[k]
            k += 1
            cell = r["added"]["accuracy"]
            ax.bar(["unsteered", "direction"], [r["unsteered"]["accuracy"], cell["value"]], color=["#999", "#36c"])
            ax.scatter(["direction"] * len(cell["controls"]), cell["controls"], color="k", zorder=3, label="random")
            ax.axhline(r["chance_accuracy"], ls=":", color="k", lw=1)
            ax.set_title(f"{title}\nTruthfulQA MC1 accuracy, direction added", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> None:
    for m in result["models"]:
        r = m.get("refusal")
        if r:
            u = r["unsteered"]
            a = r["ablate_on_harmful"]
            print(f"{m['model']} refusal (layer {r['layer']}, norm {r['norm']:.1f}): harmful {u['harmful']:.2f} -> "
                  f"{a['value']:.2f} ablated (random {', '.join(f'{c:.2f}' for c in a['controls'])})")
            for alpha, d in r["add_on_harmless"].items():
                print(f"  harmless {u['harmless']:.2f} -> {d['value']:.2f} with alpha {alpha} added (random "
                      f"{', '.join(f'{c:.2f}' for c in d['controls'])})")
        t = m["truthfulness"]
        if not t:
            continue
        acc, gold = t["added"]["accuracy"], t["added"]["gold_log_softmax"]
        print(f"{m['model']} truthfulness (layer {t['layer']}, norm {t['norm']:.1f}, {t['items']} questions): MC1 "
              f"{t['unsteered']['accuracy']:.3f} -> {acc['value']:.3f} (random {', '.join(f'{c:.3f}' for c in acc['controls'])}; "
              f"chance {t['chance_accuracy']:.3f}); gold log-softmax {t['unsteered']['gold_log_softmax']:+.3f} -> "
              f"{gold['value']:+.3f} (random {', '.join(f'{c:+.3f}' for c in gold['controls'])})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_threads(args.threads)
    out = output_path(args, "directions")
    import torch

    from kn_steer.data.contrast import load_refusal
    from kn_steer.eval.protocols import directions as protocol
    from kn_steer.models import load_hf_model, resolve_model

    refusal_dir, tqa_dir = data_dir() / "refusal", data_dir() / "truthfulqa"
    val = load_refusal(refusal_dir, "val")
    harmful, harmless = val.positive, val.negative[: args.harmless]
    done: dict[str, Any] = {}
    if out.exists() and not args.fresh:
        done = {m["model"]: m for m in json.loads(out.read_text())["models"]}

    def result() -> dict[str, Any]:
        return {"benchmark": "residual-directions", "data": {"refusal": display_path(refusal_dir),
                                                             "truthfulqa": display_path(tqa_dir)},
                "judge": list(protocol.REFUSAL_PHRASES), "models": list(done.values())}

    for name in args.models.split(","):
        ref = resolve_model(name)
        if ref.name in done:
            log(f"{ref.name}: already in {out}, skipped (--fresh reruns it)")
            continue
        model, tokenizer = load_hf_model(ref)
        entry: dict[str, Any] = {"model": ref.name, "model_title": model_title(ref.name)}
        parts = args.parts.split(",")
        if "refusal" not in parts:
            entry["refusal"] = None
            entry["refusal_skipped"] = "not run (--parts)"
        elif getattr(tokenizer, "chat_template", None):
            log(f"{ref.name}: refusal direction")
            found = find_direction(model, tokenizer, ref, refusal_dir, "refusal", chat=True)
            entry["refusal_direction"] = {k: v for k, v in found.items() if k not in ("vector", "questions")}
            entry["refusal"] = protocol.run_refusal(model, tokenizer, torch.tensor(found["vector"]), found["layer"],
                                                    harmful, harmless, args.seeds, args.max_new_tokens, args.batch_size,
                                                    alphas=[float(a) for a in args.alphas.split(",")])
        else:
            entry["refusal"] = None
            entry["refusal_skipped"] = "no chat template (a base model): no refusal behaviour to remove"
        if "truthfulness" not in parts:
            entry["truthfulness"] = None
            done[ref.name] = entry
            continue
        log(f"{ref.name}: truthfulness direction")
        found = find_direction(model, tokenizer, ref, tqa_dir, "truthfulqa", chat=False)
        entry["truthfulness_direction"] = {k: v for k, v in found.items() if k not in ("vector", "questions")}
        items = protocol.truthfulqa_items(tqa_dir, exclude=found["questions"], limit=args.questions)
        entry["truthfulness"] = protocol.run_truthfulness(model, tokenizer, torch.tensor(found["vector"]), found["layer"],
                                                          items, args.seeds, batch_size=args.batch_size)
        done[ref.name] = entry
        publish(result(), out, "repro_directions.py", argv)  # a finished model is never lost
        del model
    return publish(result(), out, "repro_directions.py", argv, plot=plot, table=table)


if __name__ == "__main__":
    main()
