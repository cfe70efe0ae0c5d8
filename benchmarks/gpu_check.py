"""Torch-only check of the serving math on a GPU: the mask bank inside captured CUDA graphs.

The GPU machines this project can borrow have torch but no vLLM, so this checks what can be checked
there with kn-steer's own serving code (``WorkerSteering``, ``NeuronMaskOp``, the site hook; none of
it imports vLLM): a small stack of gated MLP blocks whose down projections carry the hook,

1. captured in CUDA graphs for padded batch sizes (4, 8, 16 tokens), then replayed with token
   slots and slot contents changed in place between replays (new requests, evictions, positions
   moving from prompt to generated), each replay compared with an eager dense-mask reference;
2. ``prepare_step`` run under ``torch.cuda.set_sync_debug_mode("error")``: a host/device
   synchronization (a pageable copy) raises;
3. torch.compile of the same stack (what vLLM's compiled runner traces) compared the same way.

Run on a GPU: ``python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json``. On a
machine without CUDA it runs parts 3 and the eager reference on the CPU and says the rest was
skipped. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_steer.models.families import ModelShape  # noqa: E402
from kn_steer.models.sites import site_pre_hook  # noqa: E402
from kn_steer.serving import wire  # noqa: E402
from kn_steer.serving.ops.neuron_mask import NeuronMaskOp  # noqa: E402
from kn_steer.serving.worker_state import WorkerSteering  # noqa: E402
from kn_steer.steering.masks import CompiledSteering, SparseMask, dense_mask  # noqa: E402

LAYERS, HIDDEN, INTER = 4, 64, 256
SHAPE = ModelShape(LAYERS, INTER)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(HIDDEN, 2 * INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down_proj(torch.nn.functional.silu(gate) * up)


def _mask(rng: np.random.Generator, n: int, op: str) -> SparseMask:
    flat = np.sort(rng.choice(LAYERS * INTER, size=n, replace=False))
    mul = rng.uniform(-3, 3, n).astype(np.float32) if op == "scale" else np.zeros(n, np.float32)
    add = np.zeros(n, np.float32) if op == "scale" else rng.uniform(-3, 3, n).astype(np.float32)
    return SparseMask((flat // INTER).astype(np.int32), (flat % INTER).astype(np.int32), mul, add)


def _reference(blocks, x, per_token: list[tuple[CompiledSteering | None, bool]]):
    """Eager forward with each token's dense mask applied by hand."""
    dense = {}
    for compiled, _ in per_token:
        if compiled is not None and id(compiled) not in dense:
            dense[id(compiled)] = {k: dense_mask(compiled.mask(k), SHAPE, device=x.device) for k in ("prompt", "generated")}
    for layer, block in enumerate(blocks):
        gate, up = block.gate_up(x).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        rows = []
        for t, (compiled, is_prompt) in enumerate(per_token):
            if compiled is None:
                rows.append(h[t])
            else:
                mul, add = dense[id(compiled)]["prompt" if is_prompt else "generated"]
                rows.append(h[t] * mul[layer] + add[layer])
        x = x + torch.nn.functional.linear(torch.stack(rows), block.down_proj.weight)  # not through the hook
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    blocks = nn.ModuleList(Block() for _ in range(LAYERS)).to(device).eval()
    capacity = 9  # 8 usable: step 2 needs 4 specs x (prompt, generated) masks; step 3 evicts
    state = WorkerSteering(NeuronMaskOp(list(range(LAYERS)), INTER, 0, capacity, torch.float32, device, 1e4),
                           capacity, max_tokens=64, device=device)
    for layer, block in enumerate(blocks):
        block.down_proj.register_forward_pre_hook(site_pre_hook(layer, state.apply))

    def forward(x):
        for block in blocks:
            x = block(x)
        return x

    specs = {f"s{i}": CompiledSteering(_mask(rng, 40, "scale"), _mask(rng, 30, "clamp")) for i in range(8)}
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    rows: list[tuple[str, str]] = []

    def steps():
        """(requests with their specs, per-request scheduled/computed/prompt) for successive steps."""
        yield [("a", "s0"), ("b", None), ("c", "s1")], [2, 1, 1], [0, 7, 3], [2, 5, 6]
        yield [("a", "s0"), ("c", "s1"), ("d", "s2"), ("e", "s3")], [1, 1, 3, 2], [2, 4, 0, 0], [2, 6, 3, 9]
        yield [("f", "s4"), ("g", "s5"), ("d", "s2")], [4, 4, 1], [0, 0, 3], [4, 2, 3]  # evicts s0, s1
        yield [("h", "s6"), ("i", "s7"), ("b", None)], [8, 3, 1], [0, 1, 9], [5, 9, 5]

    def run_step(live, sched, comp, prompt, run):
        for req, spec in live:
            if not state.seen(req):
                state.add_request(req, None if spec is None else wire.encode(specs[spec]))
        state.prepare_step([r for r, _ in live], np.array(sched), np.array(comp), np.array(prompt))
        total = sum(sched)
        per_token = []
        for (req, spec), n, c, p in zip(live, sched, comp, prompt):
            per_token += [(None if spec is None else specs[spec], pos < p) for pos in range(c, c + n)]
        x = torch.randn(total, HIDDEN, device=device)
        got = run(x)
        want = _reference(blocks, x, per_token)
        return float((got[:total] - want).abs().max())

    # 1. CUDA graphs of padded sizes, replayed with changing slots
    if cuda:
        graphs = {}
        for size in (4, 8, 16):
            static_in = torch.zeros(size, HIDDEN, device=device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                forward(static_in)  # warm-up
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_out = forward(static_in)
            graphs[size] = (graph, static_in, static_out)

        def replay(x):
            size = next(s for s in sorted(graphs) if s >= x.shape[0])
            graph, static_in, static_out = graphs[size]
            static_in.zero_()
            static_in[: x.shape[0]].copy_(x)
            graph.replay()
            return static_out.clone()

        errors = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for live, sched, comp, prompt in steps():
                errors.append(run_step(live, sched, comp, prompt, replay))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results["cuda_graph_max_abs_error"] = max(errors)
        results["cuda_graph_steps"] = len(errors)
        rows.append(("CUDA graphs (4/8/16 padded), slots changed in place, no host sync", f"max |err| {max(errors):.2e}"))
    else:
        results["cuda_graph"] = "skipped: no CUDA device"
        rows.append(("CUDA graphs", "skipped (no CUDA device)"))

    # 3. torch.compile
    for req in list(state._requests):  # noqa: SLF001 - fresh start for the compiled pass
        state.remove_request(req)
    state._seen.clear()  # noqa: SLF001
    compiled_forward = torch.compile(forward, dynamic=True)
    started = time.perf_counter()
    with torch.no_grad():
        errors = [run_step(live, sched, comp, prompt, compiled_forward) for live, sched, comp, prompt in steps()]
    results["compiled_max_abs_error"] = max(errors)
    results["compiled_seconds"] = round(time.perf_counter() - started, 2)
    rows.append(("torch.compile (dynamic shapes), slots changed in place", f"max |err| {max(errors):.2e}"))
    ok = all(isinstance(v, str) or v < 1e-4 for k, v in results.items() if k.endswith("error"))
    results["passed"] = ok
    width = max(len(r[0]) for r in rows)
    print(f"device: {results['device']}, torch {results['torch']}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("PASSED" if ok else "FAILED")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
