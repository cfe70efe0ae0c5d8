"""Factual recall during reasoning (issue #18 item 4): a thin driver of
``kn_steer.eval.protocols.two_hop`` (chains whose two hops the model knows; the ``kn`` method on
hop 1; direct and reasoned answers under suppress x0 / enhance x2 of hop 1's neurons against
matched random neurons, every condition a request of its own in one vLLM batch).

    python benchmarks/repro_two_hop.py                                   # SmolLM2-135M
    python benchmarks/repro_two_hop.py --model gemma3-270m --chains 60

Results go to repro-results/two-hop-<model>.json (+ .png) unless --out says otherwise; screening,
per-chain localization and answers are cached: a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from repro_common import add_common, data_dir, log, output_path, publish, pyplot, setup_threads

from kn_steer.eval.cache import default_cache
from kn_steer.eval.protocols.two_hop import DOSES, TwoHopConfig, TwoHopProtocol
from kn_steer.fileio import atomic_savefig
from kn_steer.models import load_hf_model, resolve_model

MEASURES = (("direct_correct", "direct answer correct"), ("cot_correct", "reasoned answer correct"),
            ("cot_bridge", "reasoning names the bridge"))


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    o = result["overall"]
    table = Table(title=f"{result['model']}: two-hop answers over {o['chains']} chains (hop-1 knowledge neurons)")
    for col in ("measure", "unsteered", "suppress", "matched", "p vs matched", "enhance", "matched ", "p vs matched "):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for key, label in MEASURES:
        if key not in o:
            continue
        e = o[key]
        table.add_row(label, f"{e['base']:.3f}", *[x for d in DOSES for x in
                      (f"{e[d]:.3f}", f"{e[f'matched_{d}']:.3f}", f"{e[f'p_{d}_vs_matched']:.2g}")])
    lp = o.get("answer_logprob_change")
    if lp:
        table.add_row("log P(answer) change (direct)", f"{lp['base']:.2f}", *[x for d in DOSES for x in
                      (f"{lp[d]:+.3f}", f"{lp[f'matched_{d}']:+.3f}", f"{lp[f'p_{d}_vs_matched']:.2g}")])
    Console(width=160).print(table)


def plot(result: dict[str, Any], path: Path) -> None:
    o = result["overall"]
    if not o.get("chains"):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, MEASURES):
        e = o[key]
        names = ["unsteered", "suppress", "matched\nsuppress", "enhance", "matched\nenhance"]
        vals = [e["base"], e["suppress"], e["matched_suppress"], e["enhance"], e["matched_enhance"]]
        ax.bar(names, vals, color=["black", "tab:red", "silver", "tab:blue", "silver"])
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{result['model']}: {o['chains']} two-hop chains, hop-1 knowledge neurons steered")
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="two-hop JSONL (default ../shared/data/twohop/twohop_en.jsonl)")
    p.add_argument("--pairs", nargs="*", default=None, help="relation pairs r1-r2 (default: all with clozes)")
    p.add_argument("--scan", type=int, default=80, help="chains screened per pair")
    p.add_argument("--chains", type=int, default=120, help="known chains evaluated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    add_common(p)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"}.items():
        os.environ.setdefault(key, value)
    path = args.data or data_dir() / "twohop" / "twohop_en.jsonl"
    config = TwoHopConfig(pairs=args.pairs, scan=args.scan, chains=args.chains, steps=args.steps, seeds=args.seeds)
    ref = resolve_model(args.model)
    out = output_path(args, f"two-hop-{ref.name}")
    model, tok = load_hf_model(ref)
    from kn_steer.eval.vllm_backend import VLLMEvaluator

    llm = VLLMEvaluator(args.model, max_model_len=1024).llm
    log(f"two-hop recall on {path}: up to {config.chains} known chains, {config.seeds} matched controls")
    result = TwoHopProtocol(model, tok, ref, path, config, default_cache("two-hop"), llm).run()
    return publish(result, out, "repro_two_hop.py", argv, plot, print_table)


if __name__ == "__main__":
    main()
