"""``kn-steer localize METHOD``: one subcommand per method, its options generated from the method's
parameter model; the data, model and output options are shared by all methods.

``kn-steer localize ircan --help`` lists only IRCAN's options. The pre-1.0 form
``kn-steer localize --method ircan ...`` still works and prints a deprecation note.
"""

from __future__ import annotations

import inspect
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import click
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.core import TyperGroup

from kn_steer.errors import KnSteerError
from kn_steer.localize.command import (
    localize_command,
    negative_option_name,
    option_name,
)
from kn_steer.localize.methods import METHODS, CorpusMethod, ExampleMethod, Method, WeightMethod
from kn_steer.localize.runner import RunInfo, examples_path, run_localization
from kn_steer.models import DEFAULT_MODEL, ModelRef, load_hf_model, load_tokenizer, resolve_model

_DEPRECATED_METHOD_FLAG = "--method"


def _default_name(out: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", out.stem).lstrip("-_.")
    return name or "neurons"


class LocalizeGroup(TyperGroup):
    """The ``localize`` group: accepts the deprecated ``--method NAME`` form and names the methods
    when an unknown one is asked for."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            name = None
            if arg == _DEPRECATED_METHOD_FLAG and i + 1 < len(args):
                name, cut = args[i + 1], 2
            elif arg.startswith(_DEPRECATED_METHOD_FLAG + "="):
                name, cut = arg.split("=", 1)[1], 1
            if name is not None:
                del args[i:i + cut]
                args.insert(0, name)
                typer.secho(f"note: 'kn-steer localize --method {name}' is deprecated; "
                            f"use 'kn-steer localize {name}'", err=True, fg="yellow")
                break
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            raise KnSteerError(f"unknown localization method {args[0]!r}; available: {', '.join(sorted(self.commands))}")
        return super().resolve_command(ctx, args)


localize_app = typer.Typer(
    cls=LocalizeGroup, no_args_is_help=True,
    help="Find neurons with a localization method and write a neuron-set file.",
)

# ------------------------------------------------------------------------------ shared options


def _common(method: Method) -> list[inspect.Parameter]:
    formats = method.format_names or ("none",)  # a weights method reads no data (its data options are dropped)
    options: dict[str, tuple[Any, Any]] = {
        "data": (Path, typer.Option(..., "--data", help="Examples file, or data folder (see --format).")),
        "data_format": (Optional[Literal[formats]], typer.Option(  # type: ignore[valid-type]
            None, "--format",
            help=f"Data format (default {formats[0]})." + (
                " jsonl: one example per line (see the method's docs)." if "jsonl" in formats else ""))),
        "out": (Path, typer.Option(..., "--out", help="Neuron-set file to write, e.g. neuron_sets/NAME.json.")),
        "model": (str, typer.Option(DEFAULT_MODEL, "--model", "-m",
                                    help=f"{DEFAULT_MODEL!r} or a local transformers checkpoint folder.")),
        "device": (str, typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")),
        "dtype": (Literal["float32", "bfloat16"], typer.Option("float32", "--dtype", help="Weights dtype.")),
        "limit": (Optional[int], typer.Option(None, "--limit", min=1, help="Use only the first N examples.")),
        "name": (Optional[str], typer.Option(None, "--name", help="Set name (default: the output file's stem).")),
        "description": (str, typer.Option("", "--description", help="Free text stored in the set.")),
        "progress": (bool, typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")),
        "step_chunk": (Optional[int], typer.Option(
            None, "--step-chunk", min=1, help="IG steps per batched pass (lower to save memory; same result).")),
        "device_map": (Optional[Literal["auto", "balanced", "balanced_low_0", "sequential"]], typer.Option(
            None, "--device-map",
            help="Split the model over the visible devices (accelerate's device map) instead of --device: "
                 "for a model larger than one GPU. Same scores as one device.")),
        "workers": (Optional[int], typer.Option(
            None, "--workers", min=1,
            help="Shard the examples over N Ray workers, each holding the model (one CPU, or one GPU with "
                 "--device cuda); same set and checkpoint as one process. Per-example methods; needs Ray.")),
        "address": (Optional[str], typer.Option(
            None, "--address",
            help="With --workers: an existing Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of "
                 "a local one started for the run.")),
    }
    if "vllm" in getattr(method, "backends", ()):
        options["backend"] = (Literal["hf", "vllm"], typer.Option(
            "hf", "--backend", help="Where the activation pass runs: hf (transformers hooks) or vllm (the serving "
                                    "engine's read-back, same neurons and token ids)."))
    if isinstance(method, WeightMethod):  # reads the weights only: no data, nothing to shard or chunk
        for name in DATA_OPTIONS:
            options.pop(name)
    return [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
            for k, (ann, opt) in options.items()]


DATA_OPTIONS = ("data", "data_format", "limit", "step_chunk", "workers", "address")
COMMON = {p.name for m in METHODS.values() for p in _common(m)}

# ------------------------------------------------------------------------------ method options


def _option_for(field: str, info: FieldInfo) -> tuple[Any, Any]:
    """(annotation, typer.Option) of one parameter-model field; every value defaults to None so
    only what the user gives reaches pydantic, which applies the model's defaults."""
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    base = args[0] if optional else annotation
    default_text = "" if info.is_required() else f" (default: {info.default})"
    help_text = (info.description or field.replace("_", " ")) + default_text
    required = info.is_required()
    if typing.get_origin(base) is Literal:
        return Optional[base], typer.Option(... if required else None, option_name(field), help=help_text)
    if base is bool:
        return Optional[bool], typer.Option(None, f"{option_name(field)}/{negative_option_name(field)}",
                                            help=help_text)
    if typing.get_origin(base) is list and typing.get_args(base)[0] in (int, float, str):
        item = typing.get_args(base)[0]  # repeated: --layers 10 --layers 11
        return Optional[list[item]], typer.Option(None, option_name(field), help=help_text + "; repeat the option")
    if base not in (int, float, str):
        raise TypeError(f"parameter {field!r}: type {annotation} has no command-line form")
    return Optional[base], typer.Option(... if required else None, option_name(field), help=help_text)


def _method_parameters(method: Method) -> list[inspect.Parameter]:
    out = []
    for field, info in method.params_model.model_fields.items():
        if field in COMMON:
            raise TypeError(f"method {method.name!r}: parameter {field!r} clashes with a shared option")
        annotation, option = _option_for(field, info)
        out.append(inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return out


def _check_workers(method: Method, workers: int | None, address: str | None, device_map: str | None) -> None:
    """Refuse worker options that cannot apply, before anything is loaded."""
    if workers is not None and device_map is not None:
        raise KnSteerError("--device-map and --workers are not combined yet (a Ray worker gets one GPU)")
    if workers is None:
        if address is not None:
            raise KnSteerError("--address needs --workers N (how many workers to start on that cluster)")
        return
    if not isinstance(method, ExampleMethod):
        raise KnSteerError(f"--workers shards per-example methods; {method.name!r} is a corpus method "
                           "(one pass over the corpus) and runs in one process")
    from kn_steer.localize.distributed import import_ray

    import_ray()


def _driver_model(ref: ModelRef) -> tuple[Any, Any]:
    """What the driver of a distributed run needs without the weights: (config, tokenizer)."""
    from transformers import AutoConfig

    from kn_steer.models.families import adapter_for_config

    config = AutoConfig.from_pretrained(ref.path)
    adapter_for_config(config)  # fail here on unsupported families, not in every worker
    return config, load_tokenizer(ref)


def _run(method: Method, values: dict[str, Any]) -> None:
    common = {k: values.pop(k, None) for k in COMMON}  # a weights method has no data options
    values = {k: (None if v == [] or v == () else v) for k, v in values.items()}  # a list option not given
    params: BaseModel = method.parse_params(values)
    data, out = common["data"], common["out"]
    workers, address = common["workers"], common["address"]
    _check_workers(method, workers, address, common["device_map"])
    backend = common["backend"] or "hf"
    if backend == "vllm" and common["device_map"] is not None:
        raise KnSteerError("--backend vllm runs the model in vLLM; leave out --device-map")
    data_format = common["data_format"] or (method.format_names[0] if method.format_names else None)
    if isinstance(method, ExampleMethod):
        loaded = method.load(data, data_format, common["limit"])
    elif isinstance(method, CorpusMethod):
        loaded = method.load(data, data_format, params, common["limit"])
    else:
        loaded = None
    ref = resolve_model(common["model"], common["dtype"])
    scorer, config = None, None
    if workers is None:
        hf_model, tokenizer = load_hf_model(ref, dtype=common["dtype"], device=common["device"],
                                            device_map=common["device_map"])
    else:
        from kn_steer.localize.distributed import HFModelLoader, RayScorer

        hf_model = None  # the workers hold the model; this process only writes the checkpoint
        config, tokenizer = _driver_model(ref)
        gpu = common["device"].startswith("cuda")  # each actor sees only its own GPU, as "cuda"
        loader = HFModelLoader(path=str(ref.path), name=ref.name, fingerprint=ref.fingerprint,
                               dtype=common["dtype"], device="cuda" if gpu else common["device"])
        scorer = RayScorer(loader, workers, address, gpu=gpu)
    command = localize_command(method.name, params, data, data_format, out, model=common["model"],
                               dtype=common["dtype"], limit=common["limit"], name=common["name"], backend=backend)
    engine = None
    if backend == "vllm":
        from kn_steer.activations.engine import ActivationEngine

        engine = ActivationEngine(common["model"], dtype=common["dtype"])
    try:
        neuron_set = run_localization(
            method, params, loaded, hf_model, tokenizer, ref, out,
            RunInfo(name=common["name"] or _default_name(out), data_file=None if data is None else str(data),
                    description=common["description"], command=command),
            step_chunk=common["step_chunk"], progress=common["progress"], scorer=scorer, config=config,
            activations=engine,
        )
    finally:
        if engine is not None:
            engine.close()
    where = f"; per-example results: {examples_path(out)}" if isinstance(method, ExampleMethod) else ""
    source = {"example": "examples", "corpus": "corpus prompts"}.get(method.kind)
    read = f" from {neuron_set.provenance.examples} {source}" if source else " from the weights"
    units = (f"{len(neuron_set.directions)} directions" if neuron_set.directions else
             f"{len(neuron_set.neurons)} neurons" + (f" and {len(neuron_set.heads)} heads" if neuron_set.heads else ""))
    typer.echo(f"wrote {out}: {units}{read} "
               f"(layers: {neuron_set.counts_per_layer()}){where}")


def _command(method: Method):
    def command(**values: Any) -> None:
        _run(method, values)

    parameters = _common(method) + _method_parameters(method)
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    kind = {"example": "per-example", "corpus": "corpus", "weights": "weights"}[method.kind]
    command.__doc__ = (f"{method.description} ({kind} method). Resumes after an interruption."
                       if kind == "per-example" else f"{method.description} ({kind} method).")
    return command


def command_for(method: Method) -> click.Command:
    """The click command of one method (what ``kn-steer localize METHOD`` runs)."""
    group = typer.main.get_command(localize_app)
    return group.commands[method.name]  # type: ignore[attr-defined]


for _method in METHODS.values():
    localize_app.command(_method.name)(_command(_method))


def register(app: typer.Typer) -> None:
    app.add_typer(localize_app, name="localize")


def parse_localize_command(command: str) -> tuple[Method, dict[str, Any]]:
    """Parse a recorded ``kn-steer localize ...`` command with the real CLI parser: the method and
    every option's value (raises a click error when it is not a valid invocation)."""
    argv = shlex.split(command)
    if argv[:2] != ["kn-steer", "localize"] or len(argv) < 3:
        raise KnSteerError(f"not a 'kn-steer localize METHOD ...' command: {command!r}")
    method = METHODS.get(argv[2])
    if method is None:
        raise KnSteerError(f"unknown localization method {argv[2]!r} in {command!r}")
    cmd = command_for(method)
    ctx = cmd.make_context(f"kn-steer localize {method.name}", argv[3:], resilient_parsing=False)
    return method, dict(ctx.params)


__all__ = ["command_for", "localize_app", "parse_localize_command", "register"]
