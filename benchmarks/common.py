"""Shared helpers of the benchmark scripts: workloads, subprocess runs, machine record, tables, JSON.

Benchmarks compare configurations on shared, noisy machines, so every script interleaves the
configurations workload by workload and reports ratios measured in the same run. Each engine runs
in a fresh Python process of its own (vLLM engines do not shut down cleanly in-process): the
parent starts the script itself in worker mode and drives it through :class:`WorkerProcess`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from kn_steer.fileio import atomic_write_json  # noqa: E402

# Environment every vLLM engine of the benchmarks runs under (both cores for the CPU backend).
# The KV cache is capped (the machine is shared); 1 GiB holds ~23k tokens of the default model (the workload needs ~12k).
ENGINE_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


# ---------------------------------------------------------------- workloads


def random_prompts(seed: int, count: int, length: int, vocab_size: int) -> list[list[int]]:
    """``count`` prompts of ``length`` random token ids (fixed seed: every config sees the same)."""
    rng = np.random.default_rng(seed)
    # Skip the first ids: special tokens live there in most vocabularies.
    return rng.integers(100, vocab_size, size=(count, length)).tolist()


def spread_neurons(count: int, seed: int, num_layers: int, intermediate: int) -> list[list[int]]:
    """``count`` distinct ``[layer, index]`` pairs drawn uniformly over every layer (sorted)."""
    total = num_layers * intermediate
    count = min(count, total)
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, size=count, replace=False)) if count < total else np.arange(total)
    return [[int(f // intermediate), int(f % intermediate)] for f in flat]


def scale_spec(neurons: list[list[int]], factor: float = 2.0) -> dict[str, Any]:
    """A one-intervention ``kn_steer`` spec scaling ``neurons`` by ``factor``."""
    return {"interventions": [{"neurons": neurons, "op": "scale", "factor": factor}]}


def default_model_info(name: str = "smollm2-135m") -> dict[str, Any]:
    """Path and shape of a named model (prepared on first use; default: the default model)."""
    from transformers import AutoConfig

    from kn_steer.models import resolve_model
    from kn_steer.models.families import ModelShape

    ref = resolve_model(name)
    config = AutoConfig.from_pretrained(ref.path)
    shape = ModelShape.from_config(config)
    return {"name": ref.name, "path": str(ref.path), "fingerprint": ref.fingerprint,
            "num_layers": shape.num_layers, "intermediate_size": shape.intermediate_size,
            "num_heads": shape.num_heads, "hidden_size": shape.hidden_size, "vocab_size": int(config.vocab_size)}


# ---------------------------------------------------------------- machine record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, versions, date, load."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("kn-steer", "vllm-cpu", "vllm", "torch", "transformers", "openai")},
        "git_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
    }


def finish_machine(machine: dict[str, Any], load_samples: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Add the end load and the load seen during the run (other users of the machine)."""
    machine = dict(machine)
    machine["loadavg_end"] = list(os.getloadavg())
    if load_samples:
        one_min = [s[0] for s in load_samples]
        machine["loadavg_1min_during"] = {"min": min(one_min), "max": max(one_min),
                                          "mean": round(statistics.fmean(one_min), 2)}
    return machine


# ---------------------------------------------------------------- worker processes


class WorkerProcess:
    """A long-lived child process (one engine) that runs workloads on command.

    The parent starts ``python SCRIPT --worker ROLE_JSON RESULT_FD``, sends one JSON command per
    line on the child's stdin and reads one JSON answer per command from a private pipe (the
    engine's own logs go to ``log``; ``python`` runs it under another environment's interpreter). Keeping every compared engine alive at once lets the parent
    interleave configurations workload by workload, so slow phases of a shared machine hit all of
    them alike; an engine only ever runs in a fresh process of its own.
    """

    def __init__(self, script: Path, role: Mapping[str, Any], env: Mapping[str, str | None] | None = None,
                 log: Path | None = None, python: str | Path | None = None) -> None:
        child_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        self.name = str(role.get("name", script.stem))
        read_fd, write_fd = os.pipe()
        self._log = open(log, "a") if log else subprocess.DEVNULL
        if log:
            self._log.write(f"\n===== {time.strftime('%H:%M:%S')} start {script.name} {json.dumps(role)[:300]}\n")
            self._log.flush()
        self.proc = subprocess.Popen(
            [str(python or sys.executable), str(script), "--worker", json.dumps(role), str(write_fd)],
            env=child_env, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), cwd=ROOT, text=True, start_new_session=True,
        )
        os.close(write_fd)
        self._results = os.fdopen(read_fd, "r")
        self.started = time.perf_counter()
        self.ready: dict[str, Any] | None = None

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self._results], [], [], 5.0)
            if ready:
                line = self._results.readline()
                if line:
                    return json.loads(line)
            if self.proc.poll() is not None or (ready and not line):
                raise RuntimeError(f"worker {self.name} exited with code {self.proc.poll()} (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.name} gave no answer in {timeout:.0f} s")

    def wait_ready(self, timeout: float = 900) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._read(timeout)
            self.ready["process_start_s"] = round(time.perf_counter() - self.started, 2)
        return self.ready

    def call(self, command: Mapping[str, Any], timeout: float = 900) -> dict[str, Any]:
        self.wait_ready(timeout)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"worker {self.name}: {answer['error']}")
        return answer

    def close(self, timeout: float = 120) -> None:
        """Ask the worker to exit; when it does not, kill its process group (the worker and the
        engine processes it spawned, nothing else: it runs in a session of its own)."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        finally:
            # Engine processes left behind by the worker would keep cores and memory busy.
            kill_group(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.wait(30)
            self._results.close()
            if self._log is not subprocess.DEVNULL:
                self._log.close()

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve_commands(result_fd: str, ready: Mapping[str, Any], handle, shutdown=None) -> None:
    """Worker side of :class:`WorkerProcess`: answer each stdin command with ``handle(cmd)``.

    ``shutdown`` (e.g. the vLLM engine's) runs before the worker exits normally, so the engine
    processes it spawned go too.
    """
    out = os.fdopen(int(result_fd), "w")

    def send(obj: Mapping[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    send(ready)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            send(handle(command))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
            import traceback

            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})
    out.close()
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - the results are already sent; the parent cleans up
            import traceback

            traceback.print_exc()
    sys.stdout.flush()


def exit_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from ``timeout``) into SystemExit, so ``finally`` blocks stop the engines."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def kill_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM then SIGKILL to the process group ``pid`` leads (a child started in its own session)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(grace)


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """``items`` rotated by the round number: no configuration always runs first (or last)."""
    k = round_index % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


# ---------------------------------------------------------------- statistics and output


def summarize(values: Iterable[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    if not vals:
        return {}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Per-round ratios (paired: round i against round i) and their median."""
    ratios = [a / b for a, b in zip(num, den) if b]
    out = summarize(ratios)
    out["per_round"] = [round(r, 4) for r in ratios]
    return out


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console(width=160).print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_result(name: str, data: Mapping[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``folder/NAME.json`` atomically (a half-written result is never left behind)."""
    return atomic_write_json(folder / f"{name}.json", data)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- request specs of the workloads

STEERED_NEURONS = 500  # config (c): every request steered by one spec of this many neurons, scale 2
MIXED_NEURONS = (100, 300, 500, 700, 900, 1100, 1300, 1500)  # config (d): 8 distinct specs


def unit_direction(hidden: int, seed: int) -> list[float]:
    """A fixed random unit vector of the residual stream (the benchmarks' direction)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(hidden)
    return (v / np.linalg.norm(v)).tolist()


def request_specs(workload: Mapping[str, Any], n_requests: int, num_layers: int, intermediate: int,
                  num_heads: int = 0, hidden: int = 0) -> list[dict | None]:
    """The ``kn_steer`` spec of every request of a workload (None = unsteered).

    ``unsteered``; ``uniform`` (every request steered, ``distinct`` specs of ``neurons`` neurons,
    request i gets spec i mod distinct); ``mixed`` (8 specs of 100..1500 neurons and unsteered
    requests, interleaved); ``read`` (every request reads ``neurons`` neurons at every position, no
    steering); ``heads`` (every request: the ``uniform`` 500-neuron spec and two attention heads of
    every layer scaled by 0.5, so neurons and heads in one spec); ``directions`` (every request adds
    one unit direction, alpha 2, after every layer); ``everything`` (``heads``' spec, plus that
    direction added and another ablated after every layer). Neurons are drawn uniformly over
    every layer with fixed seeds, so all scripts steer the very same neurons.
    """
    kind = workload["kind"]
    if kind == "unsteered":
        return [None] * n_requests
    if kind == "uniform":
        count = num_layers * intermediate if workload["neurons"] == "all" else int(workload["neurons"])
        specs = [scale_spec(spread_neurons(count, 1000 + j, num_layers, intermediate), 2.0)
                 for j in range(int(workload["distinct"]))]
        return [specs[i % len(specs)] for i in range(n_requests)]
    if kind == "mixed":
        mixed: list[dict | None] = [
            scale_spec(spread_neurons(n, 2000 + j, num_layers, intermediate), 2.0 if j % 2 == 0 else 0.5)
            for j, n in enumerate(MIXED_NEURONS)
        ]
        mixed.append(None)
        return [mixed[i % len(mixed)] for i in range(n_requests)]
    if kind == "directions":
        add = {"direction": unit_direction(hidden, 4000), "op": "add", "alpha": 2.0, "layers": list(range(num_layers))}
        return [{"interventions": [add]}] * n_requests
    if kind == "everything":
        spec = request_specs({"kind": "heads"}, 1, num_layers, intermediate, num_heads, hidden)[0]
        spec["interventions"] += [
            {"direction": unit_direction(hidden, 4000), "op": "add", "alpha": 2.0, "layers": list(range(num_layers))},
            {"direction": unit_direction(hidden, 4001), "op": "ablate", "layers": list(range(num_layers))}]
        return [spec] * n_requests
    if kind == "heads":
        spec = scale_spec(spread_neurons(STEERED_NEURONS, 1000, num_layers, intermediate), 2.0)
        heads = [[layer, h] for layer in range(num_layers) for h in (layer % num_heads, (layer + 3) % num_heads)]
        spec["interventions"].append({"heads": heads, "op": "scale", "factor": 0.5})
        return [spec] * n_requests
    if kind == "read":  # read-back only: every request reads the same neurons at every position
        read = {"read": {"neurons": spread_neurons(int(workload["neurons"]), 3000, num_layers, intermediate),
                         "positions": "all"}}
        return [read] * n_requests
    raise ValueError(f"unknown workload kind {kind!r}")
