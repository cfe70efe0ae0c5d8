"""Time mapping every neuron to tokens through the LM head (Davies et al. map Llama-3.1-8B's
up-projection neurons in minutes): both directions, each named model, one table, one JSON.

    python benchmarks/bench_vocab_map.py                    # SmolLM2-135M and Gemma-3-270M, 1 thread
    python benchmarks/bench_vocab_map.py --models smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import time

import common

from kn_steer.localize.vocabulary import map_neurons


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=10, help="top and bottom tokens kept per neuron")
    p.add_argument("--out", default="vocab_map")
    args = p.parse_args(argv)
    import torch

    from kn_steer.models import load_hf_model, resolve_model

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    rows = []
    for name in args.models.split(","):
        ref = resolve_model(name)
        model, _ = load_hf_model(ref)
        vocab, hidden = model.get_output_embeddings().weight.shape
        for direction in ("write", "read"):
            started = time.perf_counter()
            mapped = map_neurons(model, direction, args.k, progress=True)
            wall = time.perf_counter() - started
            neurons = sum(m.top_ids.shape[0] for m in mapped.layers)
            rows.append({"model": ref.name, "direction": direction, "neurons": neurons, "vocab": vocab,
                         "hidden": hidden, "seconds": round(wall, 2), "neurons_per_s": round(neurons / wall, 1),
                         "gflop": round(2 * neurons * hidden * vocab / 1e9, 1)})
        del model
    common.print_table(f"Every neuron through the LM head ({args.threads} thread(s), top/bottom {args.k})",
                       ["model", "direction", "neurons", "vocab", "GFLOP", "seconds", "neurons/s"],
                       [[r["model"], r["direction"], r["neurons"], r["vocab"], r["gflop"], r["seconds"],
                         r["neurons_per_s"]] for r in rows])
    result = {"benchmark": "vocab-map", "threads": args.threads, "k": args.k, "rows": rows,
              "machine": common.finish_machine(machine, [])}
    print(f"wrote {common.write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
