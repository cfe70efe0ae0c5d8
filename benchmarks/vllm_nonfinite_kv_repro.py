"""Does vLLM itself let non-finite KV values of one request leak into another's output? (issue #10)

No kn-steer involved (``KN_STEER_DISABLE=1``): a tiny random Llama whose embedding row for one token
is +inf. Any request containing that token writes NaN keys/values into its KV blocks (RMSNorm of
+inf is NaN). The blocks are freed and, with few of them, handed to the next requests. Those
requests never contain the token; if their outputs differ from a clean engine's, vLLM's attention
read the stale, non-finite part of a reused block (0 x NaN = NaN).

    python benchmarks/vllm_nonfinite_kv_repro.py [--blocks 12] [--out benchmarks/results/vllm_nonfinite_kv.json]

Prints what it found and writes JSON; the finding is recorded in docs/vllm-nonfinite-kv.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

POISON = 7


def build(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  max_position_embeddings=1024, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = ["LlamaForCausalLM"]
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("inf")
    model.save_pretrained(folder)


def run(folder: Path, blocks: int, poison: bool) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="float32", max_model_len=640, max_num_seqs=8, skip_tokenizer_init=True,
              enforce_eager=True, num_gpu_blocks_override=blocks, enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    clean_prompts = [[(11 * k + 3 * i) % 200 + 20 for i in range(300 + 37 * k)] for k in range(6)]
    outputs = []
    try:
        for round_ in range(3):
            if poison:  # long requests that fill blocks with NaN, then finish and free them
                bad = [[POISON if i % 5 == 0 else (i + round_) % 200 + 20 for i in range(500)] for _ in range(2)]
                llm.generate([{"prompt_token_ids": p} for p in bad], params, use_tqdm=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in clean_prompts], params, use_tqdm=False)
            outputs.append([list(o.outputs[0].token_ids) for o in outs])
    finally:
        llm.llm_engine.engine_core.shutdown()
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12, help="KV blocks (128 tokens each on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--_child", choices=["clean", "poisoned"], help=argparse.SUPPRESS)
    parser.add_argument("--_folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:  # one engine per process: vLLM engines do not shut down cleanly in-process
        print(json.dumps(run(args._folder, args.blocks, args._child == "poisoned")))
        return 0
    import subprocess

    env = dict(os.environ, KN_STEER_DISABLE="1", VLLM_CPU_KVCACHE_SPACE="1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "poisoned-llama"
        build(folder)
        results = {}
        for mode in ("clean", "poisoned"):
            out = subprocess.run([sys.executable, __file__, "--blocks", str(args.blocks), "--_child", mode,
                                  "--_folder", str(folder)], capture_output=True, text=True, env=env, timeout=1800)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                return 1
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    differ = sum(a != b for ra, rb in zip(results["clean"], results["poisoned"]) for a, b in zip(ra, rb))
    total = sum(len(r) for r in results["clean"])
    verdict = (f"vLLM leaked: {differ} of {total} clean requests changed after requests with non-finite KV"
               if differ else f"no leak seen: all {total} clean requests identical with and without poisoned neighbours")
    print(verdict)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"blocks": args.blocks, "changed": differ, "total": total,
                                        "verdict": verdict, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
