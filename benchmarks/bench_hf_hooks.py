"""How researchers steer today: transformers ``generate`` with a forward pre-hook on every down_proj.

The same workload as ``bench_serving.py`` (random 128-token prompts, 64 greedy tokens, float32, the
default model) and the same neurons as its configuration (c) (one spec of 500 neurons over all
layers, scale 2), applied with :func:`kn_steer.steering.reference.steer` in batches of 16, against the vLLM
engine with the plugin running (c), both alive side by side and run alternately, ratios paired.

    .venv/bin/python benchmarks/bench_hf_hooks.py             # 2 repetitions (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_hf_hooks.py --reps 1 --requests 16

``bench_serving.py --with-hf`` (what ``run_all.py`` uses) runs this worker inside the serving
sessions instead, so that the ratio to (c) comes from the same repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()


def worker(role_json: str, result_fd: str) -> None:
    """Load the default model in transformers and answer ``warm``/``run`` commands."""
    import torch

    from kn_steer.models import load_hf_model, resolve_model
    from kn_steer.models.families import ModelShape
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    role = json.loads(role_json)
    batch = int(role.get("batch", 16))
    t0 = time.perf_counter()
    model, _tokenizer = load_hf_model(resolve_model(role["model"]["path"]))
    shape = ModelShape.from_config(model.config)
    startup_s = time.perf_counter() - t0

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        n_req, max_tokens = cmd["requests"], cmd["gen_len"]
        specs = common.request_specs(cmd["workload"], n_req, shape.num_layers, shape.intermediate_size)
        if cmd["op"] == "warm":
            n_req, max_tokens = min(batch, n_req), 4
            specs = specs[:n_req]
        prompts = common.random_prompts(cmd["seed"], n_req, cmd["prompt_len"], model.config.vocab_size)
        # generate() steers a whole batch alike: group requests by spec, batches of up to `batch`.
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(json.dumps(spec), []).append(i)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        generated = 0
        with torch.inference_mode():
            for key, members in groups.items():
                spec = json.loads(key)
                compiled = compile_spec(spec or {"interventions": []}, {}, shape)
                for k in range(0, len(members), batch):
                    ids = torch.tensor([prompts[i] for i in members[k:k + batch]], dtype=torch.long)
                    with steer(model, compiled, prompt_length=ids.shape[1]):
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                             do_sample=False, pad_token_id=model.config.eos_token_id)
                    generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        elapsed = time.perf_counter() - start
        return {"elapsed_s": round(elapsed, 4), "generated_tokens": generated,
                "gen_tokens_per_s": generated / elapsed,
                "total_tokens_per_s": (generated + n_req * cmd["prompt_len"]) / elapsed,
                "steered_requests": sum(s is not None for s in specs),
                "loadavg_1min": round((load + os.getloadavg()[0]) / 2, 2)}

    common.serve_commands(result_fd, {"startup_s": round(startup_s, 2), "threads": torch.get_num_threads()}, handle)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import bench_serving

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="serving_hf_hooks")
    ap.add_argument("--log", default=str(common.RESULTS / "logs" / "serving_hf_hooks.log"))
    args = ap.parse_args(argv)
    # The serving benchmark restricted to (c) plus the transformers worker: one session, paired reps.
    serving_args = ["--sessions", "1", "--reps", str(args.reps), "--scaling-reps", "0", "--configs", "steered",
                    "--with-hf", "--hf-batch", str(args.batch), "--hf-reps", str(args.reps), "--requests", str(args.requests),
                    "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                    "--out", args.out, "--log", args.log]
    return bench_serving.main(serving_args)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
