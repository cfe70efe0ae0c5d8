"""What the reproduction drivers share: threads, data paths, output paths that never overwrite a
published result or a shipped set unless asked, and the path a set's command should print."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from kn_steer.data import shared_data_dir  # noqa: E402

PUBLISHED = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "neuron_sets"
DEFAULT_OUT = Path("repro-results")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model name or checkpoint folder")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady on a shared machine; 0 = torch's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default {DEFAULT_OUT}/<name>.json; a PNG is written beside it)")
    parser.add_argument("--force", action="store_true",
                        help="allow --out to replace a published result in benchmarks/results/")


def setup_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``--out`` or ``repro-results/NAME.json``; a published result is replaced only with --force."""
    out = args.out if args.out is not None else DEFAULT_OUT / f"{name}.json"
    if out.resolve().parent == PUBLISHED.resolve() and out.exists() and not args.force:
        raise SystemExit(f"{out} is a published result: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def ship_path(value: str | None, default_name: str) -> Path | None:
    """``--ship`` (no value: neuron_sets/DEFAULT.json; a value: that path); None when not asked."""
    if value is None:
        return None
    return SHIPPED / f"{default_name}.json" if value == "" else Path(value)


def model_title(name: str) -> str:
    """How a set's description names the model: the catalog's title ("SmolLM2-135M-Instruct",
    "Gemma-3-270M base") for a named model, else the model's own name."""
    from kn_steer.models.catalog import catalog_model

    entry = catalog_model(name)
    return entry.description.split(" (")[0] if entry is not None else name


def set_prefix(name: str) -> str:
    """Shipped sets are named ``<model>-<kind>-<what>``: the model part, safe for a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name)


def display_path(path: Path) -> str:
    """A path as a set's command should print it: relative to the repository when it is nearby
    (``../shared/data/...``), else absolute."""
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)
    except ValueError:
        return str(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def data_dir() -> Path:
    return shared_data_dir()


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the drivers write PNGs, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def publish(result: dict, out: Path, script: str, argv: list[str] | None, plot=None, table=None) -> dict:
    """Record the command in ``result``, write it atomically with its PNG, print its table."""
    from kn_steer.fileio import atomic_write_json

    result["command"] = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_json(out, result)
    if plot is not None:
        plot(result, out.with_suffix(".png"))
    if table is not None:
        table(result)
    log(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot is not None else ""))
    return result


def add_fact_options(parser: argparse.ArgumentParser, relations: list[str], facts: int = 200) -> None:
    """The known-fact options of the knowledge-neuron drivers (same defaults: their caches serve each other)."""
    parser.add_argument("--data", type=Path, default=None, help="PARAREL folder (default ../shared/data/pararel)")
    parser.add_argument("--relations", nargs="+", default=relations)
    parser.add_argument("--facts", type=int, default=facts, help="known facts to localize (round-robin over relations)")
    parser.add_argument("--scan", type=int, default=400, help="facts screened per relation")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per random control and fact")
