"""Seconds per MemoTrap example: the fast exact IG engine against the per-layer reference, per model.

One row set per model (default: SmolLM2-135M and Gemma-3-270M, whose 262k-vocabulary LM head is
4x SmolLM2's and whose window attention the fast path must respect). Each measurement runs in its own worker process (model loaded and warmed up before the clock
starts), so the peak resident memory of each variant is its own; fast and reference workers are
interleaved example by example so a change in machine load hits both. Reports wall and CPU
seconds per example, peak RSS above the loaded model, the fast path's agreement with the
reference (relative error, identical top 20), and the first-order approximation's rank agreement
with full IG (Spearman over all neurons, top-20 overlap). Writes benchmarks/results/localize.json
(``models.<name>``: summary, speed-ups, agreement, runs).

    .venv/bin/python benchmarks/bench_localize.py [--data ../shared/data/memotrap/dev.jsonl]
        [--models smollm2-135m,gemma3-270m] [--examples 3] [--ref-examples 1] [--steps 20]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the per-layer reference lives with the tests (the oracle)

IRCAN_PUBLISHED_S = 94.5  # IRCAN's script, SmolLM2-135M, m=20, this machine (ENVIRONMENT.md)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_examples(data: Path, n: int) -> list:
    from kn_steer.localize.methods import get_method

    return get_method("ircan").load(data, "memotrap", limit=n)


def worker(args: argparse.Namespace) -> None:
    """Run one variant on one example; print a JSON line, save scores to --scores."""
    import torch

    from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
    from kn_steer.models import load_hf_model, resolve_model

    if args.threads:  # 1 thread: robust timings while other jobs oversubscribe the cores
        torch.set_num_threads(args.threads)
    example = _load_examples(args.data, args.index + 1)[args.index]
    model, tok = load_hf_model(resolve_model(args.model), device=args.device)
    prompt = encode_prompt(tok, example.full_prompt)
    base = encode_prompt(tok, example.prompt)
    target = encode_target(tok, example.target)
    if args.variant == "reference":
        from helpers.oracle import reference_attribution

        def run(method: str):
            return reference_attribution(model, prompt, target, steps=args.steps,
                                         baseline_ids=base if method == "ircan" else None)
    else:
        def run(method: str):
            return attribute_ids(model, prompt, target, steps=args.steps,
                                 baseline_ids=base if method == "ircan" else None,
                                 first_order=args.variant == "first-order").scores
    attribute_ids(model, prompt[-3:], target, steps=1)  # warm-up, not timed
    loaded_rss = _rss_mb()
    out = {"model": args.model, "variant": args.variant, "index": args.index, "tokens": len(prompt),
           "id": example.id}
    scores = {}
    for method in args.methods.split(","):
        wall, cpu = time.perf_counter(), time.process_time()
        scores[method] = run(method)
        out[method] = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
    out["loadavg_1m_after"] = os.getloadavg()[0]  # other jobs on the machine skew the timings
    out["peak_rss_mb"] = _rss_mb()
    out["peak_rss_above_model_mb"] = _rss_mb() - loaded_rss
    torch.save(scores, args.scores)
    print(json.dumps(out))


def _spawn(model: str, variant: str, index: int, methods: str, args: argparse.Namespace,
           tmp: Path) -> tuple[dict, dict]:
    import torch

    scores = tmp / f"{model}-{variant}-{index}.pt"
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--variant", variant, "--index", str(index),
           "--methods", methods, "--steps", str(args.steps), "--data", str(args.data),
           "--scores", str(scores), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker {model} {variant} #{index} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stdout.splitlines() if l.startswith("{")][-1]
    result = json.loads(line)
    print(f"  {model:<14} {variant:<12} #{index} ({result['tokens']} tokens): "
          + ", ".join(f"{m} {result[m]['seconds']:.2f}s (cpu {result[m]['cpu_seconds']:.2f}s)"
                      for m in methods.split(","))
          + f", load {result['loadavg_1m_after']:.1f}", flush=True)
    return result, torch.load(scores)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "memotrap" / "dev.jsonl")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma list of models")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--ref-examples", type=int, default=1)
    parser.add_argument("--ref-methods", default="ircan")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "localize.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="kn,ircan", help=argparse.SUPPRESS)
    parser.add_argument("--scores", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from kn_steer.fileio import atomic_write_json

    per_model = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        for model in args.models.split(","):
            print(f"{model}:", flush=True)
            per_model[model] = _bench_model(model, args, Path(tmp_name))
    result = {
        "benchmark": "localize", "steps": args.steps, "data": str(args.data), "device": args.device,
        "threads": args.threads, "dtype": "float32", "machine": platform.platform(),
        "ircan_published_seconds_per_example": IRCAN_PUBLISHED_S, "models": per_model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(args.out, result)

    print(f"\n{'model':<14} {'variant/method':<20} {'n':>3} {'tokens':>7} {'s/example':>10} {'cpu s':>8} "
          f"{'peak MB':>8}")
    for model, res in per_model.items():
        for key, row in res["summary"].items():
            print(f"{model:<14} {key:<20} {row['examples']:>3} {row['mean_tokens']:>7.0f} "
                  f"{row['seconds_per_example']:>10.2f} {row['cpu_seconds_per_example']:>8.2f} "
                  f"{row['peak_rss_above_model_mb']:>8.0f}")
    for model, res in per_model.items():
        speedups = res["speedup"]
        print(f"{model}: fast IRCAN vs the published script ({IRCAN_PUBLISHED_S} s, SmolLM2): "
              f"{speedups['vs_ircan_published_script']:.1f}x"
              + (f"; vs the in-repo per-layer reference (same examples): "
                 f"{speedups['vs_in_repo_reference_same_examples']:.1f}x"
                 if speedups["vs_in_repo_reference_same_examples"] else ""))
        for a in res["agreement"]:
            print("  ", {k: (round(v, 6) if isinstance(v, float) else v) for k, v in a.items()})
    print(f"wrote {args.out}")


def _bench_model(model: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Fast, first-order and (on the first examples) reference runs of one model, summarized."""
    from scipy.stats import spearmanr

    runs: list[dict] = []
    agreement: list[dict] = []
    for i in range(args.examples):
        fast, fast_scores = _spawn(model, "fast", i, "kn,ircan", args, tmp)
        first, first_scores = _spawn(model, "first-order", i, "kn,ircan", args, tmp)
        runs += [fast, first]
        for method in ("kn", "ircan"):
            a, b = first_scores[method].flatten(), fast_scores[method].flatten()
            top_a, top_b = set(a.topk(20).indices.tolist()), set(b.topk(20).indices.tolist())
            agreement.append({"index": i, "method": method, "kind": "first-order vs IG",
                              "spearman": float(spearmanr(a.numpy(), b.numpy()).statistic),
                              "top20_overlap": len(top_a & top_b) / 20})
        if i < args.ref_examples:
            ref, ref_scores = _spawn(model, "reference", i, args.ref_methods, args, tmp)
            runs.append(ref)
            for method in args.ref_methods.split(","):
                r, f = ref_scores[method], fast_scores[method]
                agreement.append({
                    "index": i, "method": method, "kind": "fast vs reference",
                    "rel_err": float((f - r).abs().max() / r.abs().max()),
                    "top20_identical": set(f.flatten().topk(20).indices.tolist())
                    == set(r.flatten().topk(20).indices.tolist()),
                })

    summary: dict[str, dict] = {}
    for variant in ("fast", "first-order", "reference"):
        for method in ("kn", "ircan"):
            rows = [r for r in runs if r["variant"] == variant and method in r]
            if not rows:
                continue
            summary[f"{variant}/{method}"] = {
                "examples": len(rows),
                "mean_tokens": _mean([r["tokens"] for r in rows]),
                "seconds_per_example": _mean([r[method]["seconds"] for r in rows]),
                "cpu_seconds_per_example": _mean([r[method]["cpu_seconds"] for r in rows]),
                "peak_rss_above_model_mb": max(r["peak_rss_above_model_mb"] for r in rows),
                "mean_loadavg_1m_after": _mean([r["loadavg_1m_after"] for r in rows]),
            }
    fast_ircan = summary["fast/ircan"]["seconds_per_example"]
    paired = [
        (r["ircan"]["seconds"],
         next(f for f in runs if f["variant"] == "fast" and f["index"] == r["index"])["ircan"]["seconds"])
        for r in runs if r["variant"] == "reference" and "ircan" in r
    ]
    fo = [a for a in agreement if a["kind"] == "first-order vs IG"]
    return {
        "summary": summary,
        "speedup": {"vs_ircan_published_script": IRCAN_PUBLISHED_S / fast_ircan,
                    "vs_in_repo_reference_same_examples": _mean([r / f for r, f in paired])},
        "agreement": agreement,
        "first_order_mean": {"spearman": _mean([a["spearman"] for a in fo]),
                             "top20_overlap": _mean([a["top20_overlap"] for a in fo])},
        "runs": runs,
    }


if __name__ == "__main__":
    main()
