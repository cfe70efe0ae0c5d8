"""Corpus statistics of every neuron through vLLM against the transformers-hook path (issue #15 item 5).

Two workloads, each on both paths, interleaved repetition by repetition in one run (the machine is
shared and noisy; ratios are paired within a repetition):

* ``token stats``: every neuron's firing count, sum and maximum over every token of ``--texts``
  texts of a JSONL corpus (default: UD EWT paragraphs, cut to ``--max-tokens``), in two groups.
  transformers: :func:`kn_steer.activations.reference.reference_stats` (left-padded batches,
  forward pre-hooks); vLLM: :meth:`ActivationEngine.token_stats` (the read op's live statistics,
  accumulated in the worker). Goal: >= 3x tokens/s.
* ``last-token activations``: every neuron at each text's last token (the relation method's
  activation pass), texts cut to ``--last-tokens``. transformers:
  :func:`kn_steer.localize.recorder.last_token_activations`; vLLM: read-back
  (:meth:`ActivationEngine.last_token_activations`).

Also timed: a plain transformers forward of the same batches without hooks (what the hook path
could reach at best), and a plain vLLM engine (plugin loaded, nothing watched or read, prefix
caching off) running the same texts with ``max_tokens=1``: what the statistics cost vLLM. Every repetition checks the two paths agree (fire-count flips, largest
difference of means and activations). The vLLM engine (default compile mode, float32) is started
before the clock; its start-up is reported apart.

    .venv/bin/python benchmarks/bench_corpus_stats.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_corpus_stats.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ENGINE_ENV, RESULTS, finish_machine, machine_info

from kn_steer.fileio import atomic_write_json


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/english/ewt_paragraphs.jsonl")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--last-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="transformers: texts per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the transformers path")
    p.add_argument("--quick", action="store_true", help="64 texts, 1 repetition")
    p.add_argument("--out", type=Path, default=RESULTS / "corpus_stats.json")
    args = p.parse_args()
    if args.quick:
        args.texts, args.repeats = 64, 1
    return args


def timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    import torch

    from kn_steer.activations import token_corpus
    from kn_steer.activations.engine import ActivationEngine
    from kn_steer.activations.reference import reference_stats
    from kn_steer.data.text import TextItem, load_texts
    from kn_steer.localize.recorder import left_padded_ids, length_batches, last_token_activations
    from kn_steer.models import load_hf_model, resolve_model
    from kn_steer.tokens import pad_id, prompt_ids

    args = parse_args()
    os.environ.update({k: v for k, v in ENGINE_ENV.items() if k not in os.environ})  # both engines
    torch.set_num_threads(args.threads)
    machine = machine_info()
    loads = [list(os.getloadavg())]
    texts = load_texts(args.data, args.texts)
    texts = [TextItem(t.id, t.text, "even" if k % 2 == 0 else "odd") for k, t in enumerate(texts)]
    ref = resolve_model(args.model)
    model, tok = load_hf_model(ref)
    corpus = token_corpus(tok, texts, args.max_tokens)
    short = token_corpus(tok, texts, args.last_tokens)
    last_texts = [tok.decode(r, skip_special_tokens=True) for r in short.rows]
    last_rows = [prompt_ids(tok, t) for t in last_texts]  # the ids both paths read
    (engine, startup_s) = timed(lambda: ActivationEngine(args.model, max_model_len=max(256, args.max_tokens + 1)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    plain = LLM(model=str(ref.path), dtype="float32", max_model_len=max(256, args.max_tokens + 1), seed=0,
                enable_prefix_caching=False)

    def vllm_plain() -> None:
        plain.generate([TokensPrompt(prompt_token_ids=r) for r in corpus.rows], SamplingParams(max_tokens=1),
                       use_tqdm=False)

    @torch.no_grad()
    def hf_plain() -> None:
        body = getattr(model, "base_model", model)
        for idx in length_batches(corpus.rows, args.batch_size):
            body(**left_padded_ids([corpus.rows[i] for i in idx], pad_id(tok)).model_inputs())

    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = ["hf", "vllm"] if rep % 2 == 0 else ["vllm", "hf"]
        got: dict[str, Any] = {}
        for path in order:
            if path == "hf":
                got["hf_stats"], got["hf_stats_s"] = timed(lambda: reference_stats(model, tok, corpus, batch_size=args.batch_size))
                got["hf_last"], got["hf_last_s"] = timed(lambda: last_token_activations(model, tok, last_texts, args.batch_size))
                _, got["hf_plain_s"] = timed(hf_plain)
            else:
                got["vllm_stats"], got["vllm_stats_s"] = timed(lambda: engine.token_stats(corpus))
                got["vllm_last"], got["vllm_last_s"] = timed(lambda: engine.last_token_activations(last_rows))
                _, got["vllm_plain_s"] = timed(vllm_plain)
        loads.append(list(os.getloadavg()))
        tokens = corpus.tokens
        flips = np.abs(got["vllm_stats"]["fires"] - got["hf_stats"]["fires"].numpy())
        means = np.abs(got["vllm_stats"]["sums"] - got["hf_stats"]["sums"].numpy()) / np.asarray(
            corpus.counts("all")[0])[:, None, None]
        run = {
            "repeat": rep, "order": order, "tokens": tokens, "texts": len(corpus.rows),
            "hf_stats_tok_s": tokens / got["hf_stats_s"], "vllm_stats_tok_s": tokens / got["vllm_stats_s"],
            "hf_plain_tok_s": tokens / got["hf_plain_s"], "vllm_plain_tok_s": tokens / got["vllm_plain_s"],
            "hf_last_text_s": len(last_rows) / got["hf_last_s"], "vllm_last_text_s": len(last_rows) / got["vllm_last_s"],
            "agreement": {"fire_flip_share": float((flips > 0).mean()), "fire_flip_max": int(flips.max()),
                          "mean_abs_diff_max": float(means.max()),
                          "last_abs_diff_max": float((got["vllm_last"] - got["hf_last"]).abs().max())},
        }
        run["stats_speedup"] = run["vllm_stats_tok_s"] / run["hf_stats_tok_s"]
        run["last_speedup"] = run["vllm_last_text_s"] / run["hf_last_text_s"]
        run["hook_cost"] = run["hf_stats_tok_s"] / run["hf_plain_tok_s"]
        run["stats_cost"] = run["vllm_stats_tok_s"] / run["vllm_plain_tok_s"]
        runs.append(run)
        print(f"repeat {rep}: token stats hf {run['hf_stats_tok_s']:.0f} tok/s, vllm {run['vllm_stats_tok_s']:.0f} "
              f"tok/s (x{run['stats_speedup']:.2f}); last-token hf {run['hf_last_text_s']:.1f} texts/s, vllm "
              f"{run['vllm_last_text_s']:.1f} (x{run['last_speedup']:.2f}); agreement {run['agreement']}", flush=True)
    engine.close()
    plain.llm_engine.engine_core.shutdown()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    summary = {key: round(med(key), 3) for key in ("hf_stats_tok_s", "vllm_stats_tok_s", "hf_plain_tok_s", "stats_speedup",
                                                   "hf_last_text_s", "vllm_last_text_s", "last_speedup", "hook_cost",
                                                   "vllm_plain_tok_s", "stats_cost")}
    result = {
        "benchmark": "corpus-stats", "model": ref.name, "data": str(args.data), "texts": len(corpus.rows),
        "tokens": corpus.tokens, "max_tokens": args.max_tokens, "last_tokens": args.last_tokens,
        "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
        "vllm_startup_s": round(startup_s, 1), "goal": {"stats_speedup": 3.0}, "summary": summary, "runs": runs,
        "machine": finish_machine(machine, loads),
        "command": "python benchmarks/bench_corpus_stats.py" + (" --quick" if args.quick else ""),
    }
    atomic_write_json(args.out, result)
    print(f"\n{'workload':<26}{'transformers':>16}{'vLLM':>12}{'ratio':>9}")
    print(f"{'token stats (tok/s)':<26}{summary['hf_stats_tok_s']:>16.0f}{summary['vllm_stats_tok_s']:>12.0f}"
          f"{summary['stats_speedup']:>9.2f}")
    print(f"{'last-token acts (texts/s)':<26}{summary['hf_last_text_s']:>16.1f}{summary['vllm_last_text_s']:>12.1f}"
          f"{summary['last_speedup']:>9.2f}")
    print(f"{'no statistics (tok/s)':<26}{summary['hf_plain_tok_s']:>16.0f}{summary['vllm_plain_tok_s']:>12.0f}"
          f"{summary['vllm_plain_tok_s'] / summary['hf_plain_tok_s']:>9.2f}")
    print(f"vLLM start-up {startup_s:.0f} s (not in the rates); wrote {args.out}")


if __name__ == "__main__":
    main()
