"""Serving overhead of the kn-steer vLLM plugin: offline throughput against plain vLLM.

One workload (default: 64 requests of 128 random prompt tokens, 64 generated tokens, greedy,
``ignore_eos``, float32, the default model, vLLM's default compilation mode) under

* (a) ``plain``: vLLM without the plugin (``VLLM_PLUGINS=""`` in that engine's processes);
* (b) ``idle``: plugin loaded, no request steered;
* (c) ``steered``: every request steered by one spec (500 neurons over all layers, scale 2);
* (d) ``mixed``: 8 distinct specs of 100..1500 neurons over all layers, plus unsteered requests;
* (e) ``reading``: every request reads 100 neurons back at every position (no steering), the
  values taken from the workers as the API server does (issue #15's goal: >= 0.95 of plain);
* (f) ``idle-noread``: plugin loaded with read-back switched off (``KN_STEER_READ_BACK=0``: the
  read op is not in the graph), no request steered: (b) / (f) is what the read op costs requests
  that read nothing;
* (g) ``watching``: plugin keeping live statistics of a 100-neuron set (``KN_STEER_WATCH``), no
  request steered: (g) / (b) is the cost of live statistics on all traffic (goal >= 0.98);
* (h) ``heads``: every request steered by (c)'s 500 neurons and two attention heads of every layer
  (issue #17: head masks and mixed neuron+head specs, goal >= 0.97 of plain);
* (i) ``directions``: every request adds a residual direction after every layer (issue #17, goal
  >= 0.97 of plain);
* (j) ``everything``: every request steers (h)'s neurons and heads, adds one direction and ablates
  another after every layer (mixed neuron+direction+head specs);
* (k) ``lens-idle``: vllm-lens 1.3.0 loaded instead of kn-steer (it forces eager mode), no request
  steered; (l) ``lens-directions``: vllm-lens adds (i)'s very vector after every layer in every
  request (``SamplingParams.extra_args["apply_steering_vectors"]``); (m) ``plain-eager``: vLLM
  without any plugin in eager mode, which separates what eager mode costs from what the hooks cost.
  These run under ``.venv-lens`` (``make lens-env``), an environment layered over ``.venv`` with
  the same vLLM and torch, so that vllm-lens never touches the other engines;

and the scaling sweeps (all requests steered): distinct specs per batch (1, 4, 16, 64; 500
neurons each) and neurons per spec (10 .. every neuron of every layer, one spec).

How it compares on a shared, noisy machine: each *session* starts two engines, each in a fresh
process of its own, one without the plugin and one with it (and, with ``--with-hf``, a
transformers process with forward pre-hooks, see ``bench_hf_hooks.py``). All stay up together; the
parent runs the workloads on them one after the other in a rotated order, repetition by
repetition, and pairs the ratios within a repetition. Configurations (b), (c), (d) and the sweeps
differ only in the requests, so they share the plugin engine. Every workload run uses fresh
prompts (no prefix-cache hits), the same ones for (a) and (b). Each engine finally checks that
steering really is on (plugin) or off (plain): clamping every neuron to 0 must change the greedy
tokens with the plugin and must not without it.

    .venv/bin/python benchmarks/bench_serving.py                 # full run (~15-25 min on 2 cores)
    .venv/bin/python benchmarks/bench_serving.py --quick         # 1 session, 1 repetition, small
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
HF_SCRIPT = SCRIPT.parent / "bench_hf_hooks.py"
TARGETS = {"idle": 0.99, "steered": 0.97, "mixed": 0.97, "reading": 0.95, "heads": 0.97, "directions": 0.97,
           "everything": 0.97}
CORE = {  # name: (engine, workload, seed slot, label)
    "plain": ("plain", {"kind": "unsteered"}, 0, "(a) plain vLLM, no plugin"),
    "idle": ("plugin", {"kind": "unsteered"}, 0, "(b) plugin loaded, no steering"),
    "steered": ("plugin", {"kind": "uniform", "distinct": 1, "neurons": common.STEERED_NEURONS}, 1,
                f"(c) all steered, 1 spec x {common.STEERED_NEURONS} neurons"),
    "mixed": ("plugin", {"kind": "mixed"}, 2, "(d) mixed: 8 specs x 100..1500 neurons + 1/9 unsteered"),
    "reading": ("plugin", {"kind": "read", "neurons": 100}, 20, "(e) every request reads 100 neurons, all positions"),
    "idle-noread": ("noread", {"kind": "unsteered"}, 0, "(f) plugin with read-back off, no steering"),
    "watching": ("watch", {"kind": "unsteered"}, 0, "(g) live statistics of a 100-neuron set, no steering"),
    "heads": ("plugin", {"kind": "heads"}, 50, f"(h) all steered, {common.STEERED_NEURONS} neurons + 2 heads a layer"),
    "directions": ("plugin", {"kind": "directions"}, 51, "(i) all steered, a direction added after every layer"),
    "everything": ("plugin", {"kind": "everything"}, 52,
                   f"(j) all steered: (h) + a direction added and one ablated after every layer"),
    "lens-idle": ("lens", {"kind": "unsteered"}, 0, "(k) vllm-lens loaded (eager), no steering"),
    "lens-directions": ("lens", {"kind": "directions"}, 51, "(l) vllm-lens: (i)'s direction after every layer"),
    "plain-eager": ("plain-eager", {"kind": "unsteered"}, 0, "(m) plain vLLM, no plugin, eager mode"),
}
LENS_PYTHON = common.ROOT / ".venv-lens" / "bin" / "python"
WATCHED_SET = {"smollm2-135m": "smollm2-135m-relation-P37", "gemma3-270m": None}  # 100 neurons
HF = ("hf", {"kind": "uniform", "distinct": 1, "neurons": common.STEERED_NEURONS}, 1,
      "transformers generate + pre-hooks, batch 16, steered as (c)")


def sweeps() -> dict[str, tuple[str, dict[str, Any], int]]:
    """Scaling workloads (all on the plugin engine). specs=1 and neurons=500 are (c) itself."""
    out: dict[str, tuple[str, dict[str, Any], int]] = {}
    slot = 3
    for n in (4, 16, 64):
        out[f"specs={n}"] = ("plugin", {"kind": "uniform", "distinct": n, "neurons": common.STEERED_NEURONS}, slot)
        slot += 1
    for k in (10, 100, 1000, 10000, "all"):
        out[f"neurons={k}"] = ("plugin", {"kind": "uniform", "distinct": 1, "neurons": k}, slot)
        slot += 1
    return out


# ---------------------------------------------------------------- worker (one engine process)


def worker(role_json: str, result_fd: str) -> None:
    """One vLLM engine in this process; answers ``warm``/``run``/``check`` commands."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    role = json.loads(role_json)
    shape = role["shape"]
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if role.get("profile_dir"):
        extra["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": role["profile_dir"],
                                    "torch_profiler_with_stack": False}
    llm = LLM(model=role["model"]["path"], dtype="float32", seed=0, enforce_eager=role["enforce_eager"], **extra)
    startup_s = time.perf_counter() - t0

    lens = role["name"] == "lens"
    lens_vectors: dict[int, Any] = {}  # one SteeringVector per distinct spec, as kn-steer caches compiled specs

    def params(spec: dict | None, max_tokens: int) -> SamplingParams:
        extra = None
        if spec is not None:
            extra = {"apply_steering_vectors": [lens_vector(spec)]} if lens else {"kn_steer": spec}
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)

    def lens_vector(spec: dict):
        """The vllm-lens form of a spec that only adds directions: alpha x v at each listed layer's output."""
        if id(spec) not in lens_vectors:
            import torch
            from vllm_lens import SteeringVector

            (add,) = spec["interventions"]
            assert add["op"] == "add" and "direction" in add, "vllm-lens runs only the directions workload"
            row = torch.tensor(add["direction"], dtype=torch.float32) * float(add["alpha"])
            lens_vectors[id(spec)] = SteeringVector(activations=row.repeat(len(add["layers"]), 1),
                                                    layer_indices=list(add["layers"]), scale=1.0, norm_match=False)
        return lens_vectors[id(spec)]

    def generate(prompts: list[list[int]], specs: list[dict | None], max_tokens: int):
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sampling = [params(s, max_tokens) for s in specs]
        start = time.perf_counter()
        outs = llm.generate(inputs, sampling, use_tqdm=False)
        return time.perf_counter() - start, outs

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["op"] == "check":
            # Clamping every neuron of every layer to 0 changes the greedy tokens iff steering is on.
            probe = common.random_prompts(999, 1, cmd["prompt_len"], shape["vocab_size"])
            everything = common.spread_neurons(shape["num_layers"] * shape["intermediate_size"], 0,
                                               shape["num_layers"], shape["intermediate_size"])
            kill = {"interventions": [{"neurons": everything, "op": "clamp", "value": 0.0}]}
            if lens:  # vllm-lens steers directions only: a large one after every layer
                kill = {"interventions": [{"direction": common.unit_direction(shape["hidden_size"], 4000), "op": "add",
                                           "alpha": 1000.0, "layers": list(range(shape["num_layers"]))}]}
            _, base = generate(probe, [None], 12)
            _, killed = generate(probe, [kill], 12)
            answer = {"steering_effective": list(base[0].outputs[0].token_ids) != list(killed[0].outputs[0].token_ids)}
            if role["name"] in ("plugin", "lens"):  # the parent compares both engines' tokens under one direction
                steer = common.request_specs({"kind": "directions"}, 1, shape["num_layers"], shape["intermediate_size"],
                                             shape["num_heads"], shape["hidden_size"])[0]
                steer = {"interventions": [{**steer["interventions"][0], "alpha": 8.0}]}
                _, steered = generate(probe, [steer], 12)
                answer["direction_tokens"] = list(steered[0].outputs[0].token_ids)
                answer["unsteered_tokens"] = list(base[0].outputs[0].token_ids)
            return answer
        n_req = cmd["requests"]
        specs = common.request_specs(cmd["workload"], n_req, shape["num_layers"], shape["intermediate_size"],
                                     shape["num_heads"], shape["hidden_size"])
        max_tokens = cmd["gen_len"]
        if cmd["op"] == "warm":  # a few requests of this workload, short
            n_req, max_tokens = min(8, n_req), 8
            specs = specs[:n_req]
        prompts = common.random_prompts(cmd["seed"], n_req, cmd["prompt_len"], shape["vocab_size"])
        load = os.getloadavg()[0]
        if cmd["op"] == "profile":
            llm.start_profile()
        elapsed, outs = generate(prompts, specs, max_tokens)
        if any(s is not None and "read" in s for s in specs):  # the values leave the workers, as over HTTP
            from kn_steer.serving.readback import read_back

            start = time.perf_counter()
            reads = read_back(llm, outs)
            elapsed += time.perf_counter() - start
            assert all(r.values.shape[0] == cmd["prompt_len"] + max_tokens - 1 for r in reads)
        if cmd["op"] == "profile":
            llm.stop_profile()
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"elapsed_s": round(elapsed, 4), "generated_tokens": generated,
                "gen_tokens_per_s": generated / elapsed,
                "total_tokens_per_s": (generated + n_req * cmd["prompt_len"]) / elapsed,
                "steered_requests": sum(s is not None for s in specs),
                "loadavg_1min": round((load + os.getloadavg()[0]) / 2, 2)}

    ready: dict[str, Any] = {"startup_s": round(startup_s, 2), "enforce_eager": llm.llm_engine.vllm_config.model_config.enforce_eager}
    if lens:
        from importlib.metadata import version

        ready["vllm_lens"] = version("vllm-lens")
    common.serve_commands(result_fd, ready, handle,
                          shutdown=lambda: llm.llm_engine.engine_core.shutdown())


# ---------------------------------------------------------------- parent


def engine_env(plugin: bool) -> dict[str, str | None]:
    env: dict[str, str | None] = dict(common.ENGINE_ENV)
    # An empty VLLM_PLUGINS list loads no general plugin; unset loads every installed one (kn_steer).
    env["VLLM_PLUGINS"] = None if plugin else ""
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2, help="fresh engine processes (each session starts new ones)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of the core configurations per session")
    ap.add_argument("--scaling-reps", type=int, default=1, help="repetitions of the sweeps per session (0: none)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--configs", default="plain,idle,steered,mixed,reading,idle-noread,watching",
                    help="comma list of core configurations")
    ap.add_argument("--with-hf", action="store_true",
                    help="also run transformers generate with pre-hooks (bench_hf_hooks.py), once per session")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-reps", type=int, default=1, help="repetitions per session that include the transformers run")
    ap.add_argument("--hf-requests", type=int, default=None,
                    help="requests of the transformers run (default --requests; its tok/s depends on the batch, not the count)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="instead of timing: one torch-profiler trace per core configuration into DIR, summarized")
    ap.add_argument("--enforce-eager", action="store_true", help="eager mode instead of the default compiled mode")
    ap.add_argument("--quick", action="store_true", help="1 session, 1 repetition, 16 requests x 32 tokens, no sweeps")
    ap.add_argument("--model", default="smollm2-135m", help="a named model (smollm2-135m, gemma3-270m)")
    ap.add_argument("--out", default=None,
                    help="result name under benchmarks/results/ (default: serving; serving_quick with --quick, "
                         "serving_profile with --profile, so neither overwrites the published full run)")
    ap.add_argument("--log", default=str(common.RESULTS / "logs" / "serving.log"), help="engine logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.reps, args.scaling_reps, args.requests, args.gen_len = 1, 1, 0, 16, 32
    if args.out is None:  # a quick or profile run never overwrites the published full run
        args.out = "serving_profile" if args.profile else "serving_quick" if args.quick else "serving"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.exit_on_sigterm()
    if args.profile:
        return profile(args)
    machine = common.machine_info()
    model = common.default_model_info(args.model)
    shape = {k: model[k] for k in ("num_layers", "intermediate_size", "num_heads", "hidden_size", "vocab_size")}
    core = {k: v for k, v in CORE.items() if k in args.configs.split(",")}
    sweep = sweeps() if args.scaling_reps > 0 else {}
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    size = {"requests": args.requests, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    runs: list[dict[str, Any]] = []  # one row per timed workload run
    engines_info: list[dict[str, Any]] = []
    loads: list[tuple[float, float, float]] = []
    started = time.time()
    for session in range(args.sessions):
        needed = {spec[0] for spec in list(core.values()) + list(sweep.values())}
        if args.with_hf:
            needed.add("hf")
        procs = start_engines(needed, model, shape, args, log)
        try:
            for name, proc in procs.items():
                info = proc.wait_ready()
                engines_info.append({"session": session, "engine": name, **info})
                print(f"[{time.strftime('%H:%M:%S')}] session {session}: {name} ready "
                      f"(engine start {info.get('startup_s')} s)", flush=True)
            # Warm every engine with every workload it will time (distinct prompts, short).
            warm_items = dict(core)
            warm_items.update(sweep)
            if args.with_hf:
                warm_items["hf"] = HF[:3]
            for name, (engine, workload, slot, *_) in warm_items.items():
                procs[engine].call({"op": "warm", "workload": workload, "seed": 7_000_000 + slot, **size})
            for rep in range(args.reps):
                items = [(n, c[0], c[1], c[2]) for n, c in core.items()]
                if rep < args.scaling_reps:
                    items += [(n, c[0], c[1], c[2]) for n, c in sweep.items()]
                if args.with_hf and rep < args.hf_reps:
                    items.append(("hf", *HF[:3]))
                for name, engine, workload, slot in common.rotated(items, rep + session * 3):
                    loads.append(os.getloadavg())
                    seed = 1_000_000 * (session + 1) + 1000 * rep + slot
                    run_size = {**size, "requests": args.hf_requests} if name == "hf" and args.hf_requests else size
                    res = procs[engine].call({"op": "run", "workload": workload, "seed": seed, **run_size})
                    runs.append({"config": name, "session": session, "rep": rep, **res})
                    print(f"[{time.strftime('%H:%M:%S')}] s{session} r{rep} {name:14s} "
                          f"{res['gen_tokens_per_s']:7.1f} tok/s  ({res['elapsed_s']:.1f} s, load {res['loadavg_1min']})",
                          flush=True)
            for name, proc in procs.items():
                if name != "hf":
                    check = proc.call({"op": "check", **size})
                    engines_info.append({"session": session, "engine": name, "check": True, **check})
                    print(f"[{time.strftime('%H:%M:%S')}] session {session}: {name} steering effective: "
                          f"{check['steering_effective']}", flush=True)
        finally:
            for proc in procs.values():
                proc.close()
    report = build_report(args, machine, model, core, sweep, runs, engines_info, loads, time.time() - started)
    common.write_result(args.out, report)
    print_report(report)
    return report


def trace_totals(paths: list[Path]) -> dict[str, float]:
    """Inclusive milliseconds per event name over chrome traces (CPU ops, annotations, kernels)."""
    import gzip

    totals: dict[str, float] = {}
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            trace = json.load(handle)
        for ev in trace.get("traceEvents", []):
            if ev.get("ph") == "X" and ev.get("cat") in ("cpu_op", "user_annotation", "kernel", "cpu_instant_event"):
                totals[ev["name"]] = totals.get(ev["name"], 0.0) + float(ev.get("dur", 0)) / 1000
    return totals


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Torch-profile each core configuration once (inductor kernels named) and compare op times."""
    model = common.default_model_info(args.model)
    shape = {k: model[k] for k in ("num_layers", "intermediate_size", "num_heads", "hidden_size", "vocab_size")}
    core = {k: v for k, v in CORE.items() if k in args.configs.split(",")}
    out_dir = Path(args.profile).resolve()
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    size = {"requests": args.requests, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    procs: dict[str, common.WorkerProcess] = {}
    summaries: dict[str, dict[str, Any]] = {}
    try:
        for name in sorted({c[0] for c in core.values()}):
            folder = out_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            env = engine_env(name == "plugin")
            env["TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE"] = "1"  # name inductor's fused C++ kernels
            procs[name] = common.WorkerProcess(SCRIPT, {"model": model, "shape": shape, "name": name,
                                                        "enforce_eager": args.enforce_eager,
                                                        "profile_dir": str(folder)}, env=env, log=log)
        for name, proc in procs.items():
            proc.wait_ready()
        for name, (engine, workload, slot, _label) in core.items():
            procs[engine].call({"op": "warm", "workload": workload, "seed": 7_000_000 + slot, **size})
        for name, (engine, workload, slot, _label) in core.items():
            folder = out_dir / engine
            before = set(folder.rglob("*"))
            res = procs[engine].call({"op": "profile", "workload": workload, "seed": 5_000_000 + slot, **size})
            time.sleep(3)
            new = sorted(p for p in set(folder.rglob("*")) - before if p.is_file() and ".json" in p.name)
            totals = trace_totals(new)
            summaries[name] = {"run": res, "traces": [str(p) for p in new], "ms": totals}
            print(f"[{time.strftime('%H:%M:%S')}] profiled {name}: {res['gen_tokens_per_s']:.1f} tok/s, "
                  f"{len(new)} trace file(s)", flush=True)
    finally:
        for proc in procs.values():
            proc.close()
    names: set[str] = set()
    for summ in summaries.values():
        names |= set(sorted(summ["ms"], key=summ["ms"].get, reverse=True)[:25])
    first = next(iter(summaries))
    rows = sorted(names, key=lambda n: -max(s["ms"].get(n, 0) for s in summaries.values()))
    common.print_table("Profiled inclusive time per event (ms; per configuration, one run each)",
                       ["event", *summaries], [[n[:70], *(s["ms"].get(n, 0.0) for s in summaries.values())] for n in rows])
    report = {"benchmark": "serving_profile", "machine": common.machine_info(), "settings": size,
              "summaries": {k: {**v, "ms": dict(sorted(v["ms"].items(), key=lambda kv: -kv[1])[:200])}
                            for k, v in summaries.items()}, "reference_config": first}
    common.write_result(args.out, report)
    return report


def start_engines(needed: set[str], model, shape, args, log: Path) -> dict[str, common.WorkerProcess]:
    """Start the engines of one session side by side (each in its own fresh process)."""
    procs: dict[str, common.WorkerProcess] = {}
    base = {"model": model, "shape": shape, "enforce_eager": args.enforce_eager}
    for name in ("plain", "plugin", "noread", "watch", "hf", "lens", "plain-eager"):
        if name not in needed:
            continue
        if name == "lens":
            if not LENS_PYTHON.exists():
                raise SystemExit(f"the vllm-lens configurations need {LENS_PYTHON.parent.parent}: run `make lens-env` "
                                 "first, or leave lens-idle and lens-directions out of --configs")
            # Only vllm-lens's plugin ("activations") loads in this engine; vllm-lens forces eager mode itself.
            procs[name] = common.WorkerProcess(SCRIPT, {**base, "name": name},
                                               env={**common.ENGINE_ENV, "VLLM_PLUGINS": "activations"},
                                               log=log, python=LENS_PYTHON)
        elif name == "plain-eager":
            procs[name] = common.WorkerProcess(SCRIPT, {**base, "name": name, "enforce_eager": True},
                                               env=engine_env(False), log=log)
        elif name == "hf":
            procs[name] = common.WorkerProcess(HF_SCRIPT, {**base, "name": "hf", "batch": args.hf_batch},
                                               env={"VLLM_PLUGINS": None}, log=log)
        else:
            env = engine_env(name != "plain")
            if name == "noread":
                env["KN_STEER_READ_BACK"] = "0"
            if name == "watch":
                if not WATCHED_SET.get(args.model):
                    raise SystemExit(f"no 100-neuron set to watch on {args.model}: leave 'watching' out of --configs")
                env["KN_STEER_WATCH"] = WATCHED_SET[args.model]
            procs[name] = common.WorkerProcess(SCRIPT, {**base, "name": name}, env=env, log=log)
    return procs


def paired(runs: list[dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    """Ratios of ``num`` to ``den`` throughput, paired by (session, repetition)."""
    by_key = {(r["session"], r["rep"]): r["gen_tokens_per_s"] for r in runs if r["config"] == den}
    pairs = [(r["gen_tokens_per_s"], by_key[(r["session"], r["rep"])]) for r in runs
             if r["config"] == num and (r["session"], r["rep"]) in by_key]
    return common.ratio_stats([a for a, _ in pairs], [b for _, b in pairs])


def build_report(args, machine, model, core, sweep, runs, engines_info, loads, wall) -> dict[str, Any]:
    def tps(name: str) -> list[float]:
        return [r["gen_tokens_per_s"] for r in runs if r["config"] == name]

    out_core: dict[str, Any] = {}
    for name, (engine, workload, _, label) in core.items():
        entry: dict[str, Any] = {"label": label, "engine": engine, "workload": workload,
                                 "gen_tokens_per_s": common.summarize(tps(name)),
                                 "per_run": [round(v, 1) for v in tps(name)]}
        if name != "plain" and "plain" in core:
            entry["ratio_to_plain"] = paired(runs, name, "plain")
            if name in TARGETS:
                entry["target"] = TARGETS[name]
                entry["meets_target"] = entry["ratio_to_plain"]["median"] >= TARGETS[name]
        if name in ("steered", "mixed", "reading", "heads", "directions", "everything") and "idle" in core:
            entry["ratio_to_idle_same_engine"] = paired(runs, name, "idle")
        if name == "lens-directions" and "lens-idle" in core:
            entry["ratio_to_idle_same_engine"] = paired(runs, name, "lens-idle")
        if name == "directions" and "lens-directions" in core:
            entry["ratio_to_vllm_lens"] = paired(runs, "directions", "lens-directions")
        if name == "idle" and "idle-noread" in core:
            entry["ratio_to_read_back_off"] = paired(runs, "idle", "idle-noread")
        if name == "watching" and "idle" in core:
            entry["ratio_to_idle"] = paired(runs, "watching", "idle")
        out_core[name] = entry
    scaling: dict[str, Any] = {}
    if sweep:
        rows = {"specs=1 (= c)": "steered", "neurons=500 (= c)": "steered", **{k: k for k in sweep}}
        order = ["specs=1 (= c)", "specs=4", "specs=16", "specs=64", "neurons=10", "neurons=100",
                 "neurons=500 (= c)", "neurons=1000", "neurons=10000", "neurons=all"]
        for label in order:
            name = rows[label]
            # The sweeps ran in the first --scaling-reps repetitions; pair (c) over those only.
            sel = [r for r in runs if r["config"] in (name, "idle", "plain") and r["rep"] < args.scaling_reps]
            scaling[label] = {"gen_tokens_per_s": common.summarize(r["gen_tokens_per_s"] for r in sel if r["config"] == name),
                              "ratio_to_idle_same_engine": paired(sel, name, "idle"),
                              "ratio_to_plain": paired(sel, name, "plain")}
    hf = None
    if args.with_hf:
        hf = {"label": HF[3], "batch": args.hf_batch, "gen_tokens_per_s": common.summarize(tps("hf")),
              "per_run": [round(v, 1) for v in tps("hf")],
              "ratio_to_vllm_steered": paired(runs, "hf", "steered"),
              "ratio_to_plain": paired(runs, "hf", "plain")}
    checks = [e for e in engines_info if e.get("check")]
    agreement = []  # kn-steer's and vllm-lens's greedy tokens under the same added direction, per session
    for session in sorted({e["session"] for e in checks}):
        by_engine = {e["engine"]: e.get("direction_tokens") for e in checks if e["session"] == session}
        if by_engine.get("plugin") and by_engine.get("lens"):
            a, b = by_engine["plugin"], by_engine["lens"]
            agreement.append({"session": session, "same_tokens": a == b,
                              "common_prefix": next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))})
    checks_ok = all(e["steering_effective"] == (e["engine"] not in ("plain", "plain-eager")) for e in checks)
    return {
        "benchmark": "serving", "machine": common.finish_machine(machine, loads), "model": model,
        "settings": {"requests": args.requests, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                     "sessions": args.sessions, "reps": args.reps, "scaling_reps": args.scaling_reps,
                     "dtype": "float32", "greedy": True, "ignore_eos": True,
                     "compilation": "enforce_eager" if args.enforce_eager else "default (compiled)",
                     "engine_env": common.ENGINE_ENV, "plain_engine_env": {"VLLM_PLUGINS": ""}},
        "wall_s": round(wall, 1), "steering_checks_ok": checks_ok, "direction_agreement_with_vllm_lens": agreement,
        "core": out_core, "scaling": scaling, "hf_hooks": hf, "engines": engines_info, "runs": runs,
    }


def print_report(report: dict[str, Any]) -> None:
    def fmt_list(vals) -> str:
        return " ".join(f"{v:.3f}" if v < 10 else f"{v:.0f}" for v in vals)

    rows = []
    for name, e in report["core"].items():
        r = e.get("ratio_to_plain", {})
        rows.append([e["label"], e["gen_tokens_per_s"]["median"], fmt_list(e["per_run"]), r.get("median"),
                     fmt_list(r.get("per_round", [])), e.get("target"),
                     {True: "yes", False: "NO"}.get(e.get("meets_target"), "-")])
    if report.get("hf_hooks"):
        h = report["hf_hooks"]
        rows.append([h["label"], h["gen_tokens_per_s"].get("median"), fmt_list(h["per_run"]),
                     h["ratio_to_plain"].get("median"), fmt_list(h["ratio_to_plain"].get("per_round", [])), None, "-"])
    m, st = report["machine"], report["settings"]
    common.print_table(
        "Serving throughput (generated tokens/s) and paired ratio to plain vLLM",
        ["configuration", "tok/s (median)", "per run", "ratio to (a)", "per-run ratios", "target", "met"],
        rows, caption=f"{m['cpu_model']}, {m['usable_cores']} cores; {st['requests']} requests x "
                      f"{st['prompt_len']}+{st['gen_len']} tokens; {st['compilation']}; "
                      f"steering checks ok: {report['steering_checks_ok']}; load {m.get('loadavg_1min_during', {})}")
    idle = report["core"].get("idle", {}).get("ratio_to_read_back_off")
    if idle:
        print(f"(b) / (f): what the read op in the graph costs requests that read nothing: {idle.get('median')} "
              f"(per run {idle.get('per_round')})")
    versus_lens = report["core"].get("directions", {}).get("ratio_to_vllm_lens")
    for row in report.get("direction_agreement_with_vllm_lens", []):
        print(f"session {row['session']}: kn-steer and vllm-lens, one direction (alpha 8) after every layer: "
              f"same 12 greedy tokens {row['same_tokens']} (first {row['common_prefix']} agree)")
    if versus_lens:
        print(f"(i) / (l): kn-steer over vllm-lens, the same direction after every layer: {versus_lens.get('median')} "
              f"(per run {versus_lens.get('per_round')})")
    watching = report["core"].get("watching", {}).get("ratio_to_idle")
    if watching:
        print(f"(g) / (b): what live statistics of a 100-neuron set cost all traffic: {watching.get('median')} "
              f"(per run {watching.get('per_round')}; goal >= 0.98)")
    if report.get("hf_hooks"):
        r = report["hf_hooks"]["ratio_to_vllm_steered"]
        print(f"transformers+hooks / vLLM+plugin (c): {r.get('median')} (per run {r.get('per_round')})")
    if report["scaling"]:
        rows = [[name, e["gen_tokens_per_s"].get("median"), e["ratio_to_idle_same_engine"].get("median"),
                 e["ratio_to_plain"].get("median")] for name, e in report["scaling"].items()]
        common.print_table("Scaling (every request steered, 500 neurons per spec / 1 spec)",
                           ["workload", "tok/s (median)", "ratio to (b) same engine", "ratio to (a)"], rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
