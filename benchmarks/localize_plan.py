"""A PLAN, not a measurement: localization memory and time per example at 8B and 70B, derived from
the engine's cost model and the numbers measured on SmolLM2-135M and Gemma-3-270M.

Cost model (``kn_steer/localize/engine.py``): per example, three no-grad prompt forwards (baseline
prompt, prefix, last token), then one batched pass per step chunk that walks layers ``0..L-1``
with ``c (j + 1)`` single-position rows at layer ``j`` (``c`` steps per chunk, ``m`` in all):
``m L (L + 1) / 2`` row-layer evaluations, then ``m L`` rows through the LM head. The weights are
frozen, so the backward computes input gradients only: about as many FLOPs as the forward.

* FLOPs per row-layer: ``4 P_layer`` (2 forward + 2 backward per weight) plus attention over the
  prompt and the packed window (``12 heads head_dim keys``, forward + backward).
* FLOPs per head row: ``4 H V`` (two matmuls over the vocabulary, ``_TargetProbability``).
* Activation memory: what autograd keeps until the backward, per row-layer. ``--measure`` counts
  it on one MemoTrap example on SmolLM2-135M (a Llama, as Llama-3.1 is) with
  ``torch.autograd.graph.saved_tensors_hooks``, split by width (intermediate ``I``, hidden ``H``,
  the rest), and scales each part by the target model's ``I`` and ``H``.

Writes ``benchmarks/results/localize_plan.json``; the table in ``benchmarks/README.md``
("Localization at 8B and 70B") is this script's output.

    .venv/bin/python benchmarks/localize_plan.py [--measure] [--steps 20] [--prompt-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TOKEN_CHUNK = 640  # kn_steer.localize.engine.TOKEN_CHUNK: packed rows per layer call


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model (published config.json values)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + embed * (1 if self.tied else 2)


MODELS = {
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 64, 49152, True),
    "gemma3-270m": Shape(18, 640, 2048, 4, 1, 256, 262144, True),
    "llama-3.1-8b": Shape(32, 4096, 14336, 32, 8, 128, 128256, False),
    "llama-3.1-70b": Shape(80, 8192, 28672, 64, 8, 128, 128256, False),
}

# Assumed accelerators (vendor datasheet figures, dense bf16, SXM): peak FLOP/s and HBM bandwidth.
GPUS = {
    "H100-80GB": {"memory_gb": 80, "bf16_tflops": 989, "hbm_tb_s": 3.35},
    "H200-141GB": {"memory_gb": 141, "bf16_tflops": 989, "hbm_tb_s": 4.8},
}
MFU = (0.25, 0.5)  # assumed fraction of peak reached by the batched pass (moderate GEMMs, Python per layer)


def row_counts(shape: Shape, steps: int, chunk: int) -> list[int]:
    """Rows at each layer of one pass, for every pass: c (j + 1)."""
    rows = []
    for start in range(0, steps, chunk):
        c = min(chunk, steps - start)
        rows += [c * (j + 1) for j in range(shape.layers)]
    return rows


def flops(shape: Shape, steps: int, prompt_tokens: int, chunk: int) -> dict[str, float]:
    """FLOPs of one example by part (see the module doc)."""
    rows = row_counts(shape, steps, chunk)
    row_layers = sum(rows)
    attention = sum(r * 12 * shape.heads * shape.head_dim * (prompt_tokens + min(r, TOKEN_CHUNK)) for r in rows)
    return {
        "row_layer_evaluations": row_layers,
        "layers": 4.0 * shape.layer_params * row_layers,
        "attention": float(attention),
        "head": 4.0 * shape.hidden * shape.vocab * steps * shape.layers,
        "prompt_forwards": 2.0 * shape.params * 2 * prompt_tokens,
    }


def weight_reads(shape: Shape, steps: int, chunk: int, bytes_per_value: int) -> float:
    """Bytes of weights read per example: every layer call reads its layer's weights, forward and
    backward (a lower bound on time when the batches are small)."""
    calls = sum(math.ceil(r / TOKEN_CHUNK) for r in row_counts(shape, steps, chunk))
    passes = math.ceil(steps / chunk)
    head = shape.vocab * shape.hidden * passes
    return float(2 * calls * shape.layer_params + head) * bytes_per_value


def activation_bytes(shape: Shape, steps: int, chunk: int, per_row_layer: dict[str, float],
                     bytes_per_value: int, reference: Shape) -> float:
    """Autograd's saved tensors at the end of the largest pass, scaled from the measured model:
    the intermediate-width part by I, the hidden-width part by H, the rest by heads x head_dim."""
    c = min(chunk, steps)
    row_layers = c * shape.layers * (shape.layers + 1) // 2
    scale = bytes_per_value / 4  # measured in float32
    per = (per_row_layer["intermediate"] * shape.intermediate / reference.intermediate
           + per_row_layer["hidden"] * shape.hidden / reference.hidden
           + per_row_layer["other"] * (shape.heads * shape.head_dim) / (reference.heads * reference.head_dim))
    return row_layers * per * scale


def measure(steps: int) -> dict:
    """One MemoTrap example on SmolLM2-135M, float32, 1 thread: seconds and saved activations."""
    import torch

    from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
    from kn_steer.localize.methods import get_method
    from kn_steer.models import load_hf_model, resolve_model

    torch.set_num_threads(1)
    data = ROOT.parent / "shared" / "data" / "memotrap" / "dev.jsonl"
    example = get_method("ircan").load(data, "memotrap", limit=1)[0]
    model, tok = load_hf_model(resolve_model("smollm2-135m"))
    shape = MODELS["smollm2-135m"]
    prompt = encode_prompt(tok, example.full_prompt)
    args = dict(baseline_ids=encode_prompt(tok, example.prompt), steps=steps)
    target = encode_target(tok, example.target)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t

    attribute_ids(model, prompt, target, **args)  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attribute_ids(model, prompt, target, **args)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    parts = {"intermediate": 0, "hidden": 0, "other": 0}
    for nbytes, dims in saved.values():
        last = dims[-1] if dims else 0
        parts["intermediate" if last == shape.intermediate else "hidden" if last == shape.hidden else "other"] += nbytes
    row_layers = steps * shape.layers * (shape.layers + 1) // 2
    return {
        "model": "smollm2-135m", "dtype": "float32", "threads": 1, "steps": steps,
        "prompt_tokens": len(prompt), "example": example.id,
        "seconds": wall, "cpu_seconds": cpu, "loadavg_1m": os.getloadavg()[0],
        "saved_bytes": parts, "saved_bytes_total": sum(parts.values()),
        "saved_bytes_per_row_layer": {k: v / row_layers for k, v in parts.items()},
        "note": "saved tensors counted once per storage; parameters excluded; CPU attention path",
    }


def plan(steps: int, prompt_tokens: int, measured: dict, cpu_gflops: dict[str, float]) -> dict:
    per_row_layer = measured["saved_bytes_per_row_layer"]
    reference = MODELS[measured["model"]]
    out: dict = {}
    for name, shape in MODELS.items():
        rows: dict = {"shape": asdict(shape), "params": shape.params, "layer_params": shape.layer_params}
        for chunk in sorted({steps, 5, 2, 1}, reverse=True):
            f = flops(shape, steps, prompt_tokens, chunk)
            total = f["layers"] + f["attention"] + f["head"] + f["prompt_forwards"]
            cfg: dict = {"flops": f, "total_flops": total,
                         "activations_gb_bf16": activation_bytes(shape, steps, chunk, per_row_layer, 2, reference) / 1e9,
                         "activations_gb_fp32": activation_bytes(shape, steps, chunk, per_row_layer, 4, reference) / 1e9,
                         "weights_gb_bf16": shape.params * 2 / 1e9, "weights_gb_fp32": shape.params * 4 / 1e9}
            reads = weight_reads(shape, steps, chunk, 2)
            for gpu, spec in GPUS.items():
                compute = [total / (spec["bf16_tflops"] * 1e12 * mfu) for mfu in reversed(MFU)]
                memory = reads / (spec["hbm_tb_s"] * 1e12)
                cfg[f"seconds_{gpu}"] = [max(c, memory) for c in compute]  # [optimistic, pessimistic]
            cfg["cpu_seconds_1_thread"] = {k: total / (g * 1e9) for k, g in cpu_gflops.items()}
            rows[f"step_chunk_{chunk}"] = cfg
        out[name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="count saved activations on SmolLM2 (seconds of CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length assumed for 8B/70B")
    parser.add_argument("--out", default=str(RESULTS / "localize_plan.json"))
    args = parser.parse_args()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    measured = measure(args.steps) if args.measure else previous.get("measured")
    if measured is None:
        parser.error("no measurement yet: run with --measure once")
    # the cost model against the engine's measured CPU seconds (1 thread, m = 20, MemoTrap):
    # localize_threads1.json (SmolLM2, quiet) and localize_two_models_threads1.json (both, load 7-8)
    calibration = {}
    quiet = json.loads((RESULTS / "localize_threads1.json").read_text())["summary"]["fast/ircan"]
    both = json.loads((RESULTS / "localize_two_models_threads1.json").read_text())["models"]
    tokens = {"smollm2-135m": both["smollm2-135m"]["summary"]["fast/ircan"]["mean_tokens"],
              "gemma3-270m": both["gemma3-270m"]["summary"]["fast/ircan"]["mean_tokens"]}
    for label, model, seconds in [
        ("smollm2-135m quiet (localize_threads1.json)", "smollm2-135m", quiet["cpu_seconds_per_example"]),
        ("smollm2-135m loaded (localize_two_models_threads1.json)", "smollm2-135m",
         both["smollm2-135m"]["summary"]["fast/ircan"]["cpu_seconds_per_example"]),
        ("gemma3-270m loaded (localize_two_models_threads1.json)", "gemma3-270m",
         both["gemma3-270m"]["summary"]["fast/ircan"]["cpu_seconds_per_example"]),
        ("smollm2-135m this run (--measure)", "smollm2-135m", measured["cpu_seconds"]),
    ]:
        prompt = measured["prompt_tokens"] if "this run" in label else round(tokens[model])
        f = flops(MODELS[model], args.steps, prompt, args.steps)
        total = f["layers"] + f["attention"] + f["head"] + f["prompt_forwards"]
        calibration[label] = {"model_gflop": total / 1e9, "cpu_seconds": seconds,
                              "effective_gflops": total / 1e9 / seconds}
    cpu_gflops = {"quiet": calibration["smollm2-135m quiet (localize_threads1.json)"]["effective_gflops"]}
    result = {
        "kind": "PLAN (derived, not measured at 8B/70B)", "steps": args.steps,
        "prompt_tokens_assumed": args.prompt_tokens, "gpus_assumed": GPUS, "mfu_assumed": MFU,
        "measured": measured, "calibration": calibration,
        "plan": plan(args.steps, args.prompt_tokens, measured, cpu_gflops),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    fd, tmp = tempfile.mkstemp(dir=Path(args.out).parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(tmp, args.out)
    for label, c in calibration.items():
        print(f"{label}: model {c['model_gflop']:.0f} GFLOP, {c['cpu_seconds']:.2f} CPU s -> "
              f"{c['effective_gflops']:.0f} GFLOP/s")
    print("saved activations per row-layer (float32, SmolLM2):", measured["saved_bytes_per_row_layer"])
    for name, rows in result["plan"].items():
        for key, cfg in rows.items():
            if not key.startswith("step_chunk"):
                continue
            print(f"{name:14s} {key:13s} {cfg['total_flops'] / 1e12:8.2f} TFLOP  weights bf16 "
                  f"{cfg['weights_gb_bf16']:7.1f} GB  activations bf16 {cfg['activations_gb_bf16']:7.2f} GB  "
                  f"H100 {cfg['seconds_H100-80GB'][0]:.2f}-{cfg['seconds_H100-80GB'][1]:.2f} s  "
                  f"H200 {cfg['seconds_H200-141GB'][0]:.2f}-{cfg['seconds_H200-141GB'][1]:.2f} s  "
                  f"CPU 1 thread {cfg['cpu_seconds_1_thread']['quiet']:.0f} s")


if __name__ == "__main__":
    main()
