"""Run every benchmark script, one after the other, and list the result files they wrote.

* ``bench_serving.py --with-hf``: serving overhead (a)-(d), scaling sweeps, and transformers
  ``generate`` with pre-hooks in the same sessions (so its ratio to vLLM+plugin (c) is paired);
* ``bench_http.py``: TTFT / TPOT through the HTTP server, steered and unsteered, vs plain vLLM;
* ``bench_localize.py`` (when present): localization speed and memory, fast path vs reference.

    .venv/bin/python benchmarks/run_all.py             # everything (~30-40 min on 2 idle cores)
    .venv/bin/python benchmarks/run_all.py --quick     # a smoke run of each script
    .venv/bin/python benchmarks/run_all.py --only serving,http

A failing script does not stop the others; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(quick: bool) -> dict[str, list[str]]:
    """name -> argv (after the interpreter) of each benchmark."""
    out = {
        "serving": [str(HERE / "bench_serving.py"), "--with-hf"] + (["--quick"] if quick else []),
        "http": [str(HERE / "bench_http.py")] + (["--rounds", "1", "--waves", "2"] if quick else []),
    }
    localize = HERE / "bench_localize.py"
    if localize.is_file():
        argv = [str(localize)]
        if quick:
            help_text = subprocess.run([sys.executable, str(localize), "--help"], capture_output=True, text=True).stdout
            if "--quick" in help_text:
                argv.append("--quick")
            elif "--examples" in help_text and "--ref-examples" in help_text:
                argv += ["--examples", "1", "--ref-examples", "1"]
        out["localize"] = argv
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small, fast settings for every script")
    ap.add_argument("--only", default=None, help="comma list among serving,http,localize")
    args = ap.parse_args(argv)
    todo = scripts(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(todo)
        if unknown:
            ap.error(f"unknown or unavailable benchmark(s): {', '.join(sorted(unknown))}")
        todo = {k: v for k, v in todo.items() if k in wanted}
    status: dict[str, tuple[int, float]] = {}
    for name, cmd in todo.items():
        print(f"\n=== {name}: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, *cmd]).returncode
        status[name] = (rc, time.perf_counter() - start)
    print("\n=== summary")
    for name, (rc, secs) in status.items():
        print(f"{name:10s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {secs / 60:6.1f} min")
    results = sorted(p.relative_to(HERE.parent) for p in (HERE / "results").glob("*.json"))
    print("results:", ", ".join(str(p) for p in results))
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
