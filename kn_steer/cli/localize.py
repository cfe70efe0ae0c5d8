"""``kn-steer localize``: find neurons with a registered method and write a neuron-set file."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import DEFAULT_MODEL


def _default_name(out: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", out.stem).lstrip("-_.")
    return name or "neurons"


def _parse_params(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; VALUE as JSON when it parses (numbers, booleans), else a string."""
    import json

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KnSteerError(f"--param {item!r}: expected KEY=VALUE")
        try:
            parsed[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.replace("-", "_")] = raw
    return parsed


def _load_examples(spec, data: Path, data_format: str, limit: int | None) -> list:
    """Generic JSONL through the method's example model, or a dataset loader of kn_steer.data."""
    if data_format == "jsonl":
        return spec.load_examples(data, limit)
    import kn_steer.data as datasets

    loader = getattr(datasets, f"load_{spec.name}_examples", None)
    if loader is None:
        raise KnSteerError(f"--format {data_format!r} is not available for method {spec.name!r}; use jsonl")
    examples = loader(data, data_format, limit)
    if not examples:
        raise KnSteerError(f"{data}: no examples")
    return examples


def register(app: typer.Typer) -> None:
    @app.command("localize")
    def localize(
        method: str = typer.Option(..., "--method", help="Localization method: kn or ircan (or a plugged-in one)."),
        data: Path = typer.Option(..., "--data", help="Examples file (see --format)."),
        data_format: str = typer.Option("jsonl", "--format",
                                        help="jsonl (kn_steer.localize.examples) or a dataset format "
                                             "of kn_steer.data, e.g. memotrap or kre for ircan."),
        out: Path = typer.Option(..., "--out", help="Neuron-set file to write, e.g. neuron_sets/NAME.json."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help=f"{DEFAULT_MODEL!r} or a local transformers checkpoint folder."),
        steps: int = typer.Option(None, "--steps", help="Integrated-gradients steps m (default 20)."),
        top_k: int = typer.Option(None, "--top-k", help="ircan: neurons kept per example (default 20)."),
        count: int = typer.Option(None, "--count", help="ircan: neurons in the set, h (default 14)."),
        threshold: float = typer.Option(None, "--threshold", help="kn: coarse threshold t x max (default 0.2)."),
        p: float = typer.Option(None, "--p", help="kn: keep neurons in > p of a fact's prompts (default 0.5)."),
        fact_fraction: float = typer.Option(None, "--fact-fraction",
                                            help="kn: keep neurons in > this fraction of facts (default 0: union)."),
        max_neurons: int = typer.Option(None, "--max-neurons", help="kn: cap the set size."),
        relation: str = typer.Option(None, "--relation",
                                     help="relation: the PARAREL relation id (e.g. P36); --data is the PARAREL folder."),
        target_mode: str = typer.Option(None, "--target-mode", help="first (default) or sum over target tokens."),
        first_order: bool = typer.Option(False, "--first-order",
                                         help="Gradient x activation in one pass (an approximation)."),
        factor: float = typer.Option(None, "--factor",
                                     help="Default operation: scale by this factor (kn 0.0, ircan 2.0)."),
        limit: int = typer.Option(None, "--limit", help="Use only the first N examples."),
        name: str = typer.Option(None, "--name", help="Set name (default: the output file's stem)."),
        description: str = typer.Option("", "--description", help="Free text stored in the set."),
        step_chunk: int = typer.Option(None, "--step-chunk",
                                       help="Steps per batched pass (lower to save memory; same result)."),
        device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 (default) or bfloat16."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        param: list[str] = typer.Option([], "--param",
                                        help="Any method parameter as KEY=VALUE (VALUE read as JSON "
                                             "when it parses), e.g. --param relation=P36. Repeatable."),
    ) -> None:
        """Score every example, select the neurons, write the set (resumes after an interruption)."""
        from kn_steer.localize.methods import get_method
        from kn_steer.localize.runner import RunInfo, examples_path, run_localization
        from kn_steer.models import load_hf_model, resolve_model

        spec = get_method(method)
        if dtype not in ("float32", "bfloat16"):
            raise KnSteerError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
        if limit is not None and limit < 1:
            raise KnSteerError(f"--limit must be at least 1, got {limit}")
        given = dict(steps=steps, top_k=top_k, count=count, threshold=threshold, p=p,
                     fact_fraction=fact_fraction, max_neurons=max_neurons, relation=relation, target_mode=target_mode,
                     first_order=first_order or None, factor=factor)
        given.update(_parse_params(param))
        fields = spec.params_model.model_fields
        unused = [k for k, v in given.items() if v is not None and k not in fields]
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise KnSteerError(
                f"{flags} do(es) not apply to method {spec.name!r} (its parameters: {', '.join(fields)})"
            )
        params = spec.parse_params(given)
        examples = _load_examples(spec, data, data_format, limit)
        ref = resolve_model(model, dtype)  # type: ignore[arg-type]
        hf_model, tokenizer = load_hf_model(ref, dtype=dtype, device=device)
        neuron_set = run_localization(
            spec, params, examples, hf_model, tokenizer, ref, out,
            RunInfo(name=name or _default_name(out), data_file=str(data), description=description,
                    command=shlex.join(["kn-steer", *sys.argv[1:]])),
            step_chunk=step_chunk, progress=progress,
        )
        counts = neuron_set.counts_per_layer()
        typer.echo(f"wrote {out}: {len(neuron_set.neurons)} neurons from {len(examples)} examples "
                   f"(layers: {dict(counts)}); per-example results: {examples_path(out)}")
