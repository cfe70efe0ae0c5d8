"""Mask-bank memory per worker for large models, before and after the memory budget (issue #11).

The bank holds ``[layers on this worker, slots, neurons on this rank]`` twice (multiply and add).
Sized for the worst case, every running request with two distinct masks (``2 * max_num_seqs + 1``
slots), it took 3.5 GiB from the KV cache of Llama-3.1-8B at vLLM's GPU default of 1,024 sequences.
kn-steer now sizes it from a budget (``KN_STEER_BANK_MIB``, default 256 MiB) with the same function
the server uses (:func:`kn_steer.serving.engine_config.bank_slots`), and the scheduler admits at most
``slots - 1`` distinct masks at once (nothing is lost in correctness: other requests wait, as for
``max_loras``). Prints a table and writes JSON; computed, not measured (no GPU is needed).

    python benchmarks/bank_memory.py --out benchmarks/results/bank_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_steer.serving.engine_config import bank_slots  # noqa: E402

MODELS = [  # name, layers, intermediate size, tensor parallel, pipeline parallel
    ("SmolLM2-135M (this project's CPU default)", 30, 1536, 1, 1),
    ("Llama-3.1-8B", 32, 14336, 1, 1),
    ("Qwen2.5-32B, TP=2", 64, 27648, 2, 1),
    ("Llama-3.1-70B, TP=4", 80, 28672, 4, 1),
]


def rows(max_num_seqs: int, dtype_bytes: int) -> list[dict]:
    out = []
    for name, layers, inter, tp, pp in MODELS:
        config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                                 scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
        local_layers, local = math.ceil(layers / pp), math.ceil(inter / tp)
        per_slot = local_layers * local * 2 * dtype_bytes
        worst = 2 * max_num_seqs + 1
        slots, admission = bank_slots(config, layers, inter, dtype_bytes)
        out.append({"model": name, "layers": layers, "intermediate": inter, "tp": tp, "max_num_seqs": max_num_seqs,
                    "worst_case_slots": worst, "worst_case_mib": worst * per_slot / 2**20,
                    "slots": slots, "bank_mib": slots * per_slot / 2**20, "distinct_masks_at_once": slots - 1,
                    "admission_control": admission})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bfloat16, 4 for float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    table = rows(args.max_num_seqs, args.dtype_bytes)
    print("| model | worst case: slots, MiB per worker | budgeted: slots, MiB per worker | distinct masks at once |")
    print("| --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['model']} | {r['worst_case_slots']}, {r['worst_case_mib']:,.0f} | {r['slots']}, "
              f"{r['bank_mib']:,.0f} | {r['distinct_masks_at_once']}{' (admission control)' if r['admission_control'] else ''} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"budget_mib": 256, "dtype_bytes": args.dtype_bytes, "rows": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
