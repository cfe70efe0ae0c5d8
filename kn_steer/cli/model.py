"""``kn-steer model prepare|info``: make the default model usable offline and describe a model.

Both commands read only the config and weights files (no full model load), so they are quick.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import (
    DEFAULT_MODEL,
    Dtype,
    ModelRef,
    prepare_default_model,
    resolve_model,
)


@dataclass(frozen=True)
class ModelInfo:
    """What a user needs to know about a model before localizing neurons in it."""

    ref: ModelRef
    architecture: str
    family: str
    num_layers: int
    intermediate_size: int
    hidden_size: int | None
    vocab_size: int | None
    neuron_module: str  # e.g. model.layers.{i}.mlp.down_proj: the neuron is its input
    serving: bool


def model_info(ref: ModelRef) -> ModelInfo:
    """Describe a resolved model from its config (unsupported families raise a clear error)."""
    from transformers import AutoConfig

    from kn_steer.models.families import ModelShape, adapter_for_config

    try:
        config = AutoConfig.from_pretrained(ref.path)
    except (OSError, ValueError) as exc:
        raise KnSteerError(f"cannot read the config of model {ref.path}: {exc}") from exc
    adapter = adapter_for_config(config)
    shape = ModelShape.from_config(config)
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return ModelInfo(
        ref=ref, architecture=arch, family=adapter.family, num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size, hidden_size=hidden,
        vocab_size=getattr(config, "vocab_size", None),
        neuron_module=f"{adapter.layers_path}.{{i}}.{adapter.out_proj}", serving=adapter.serving,
    )


def _print_info(info: ModelInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model {info.ref.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("path", str(info.ref.path)),
        ("fingerprint", info.ref.fingerprint),
        ("architecture", f"{info.architecture} (family {info.family})"),
        ("layers", str(info.num_layers)),
        ("neurons per layer", str(info.intermediate_size)),
        ("neurons in all", str(info.num_layers * info.intermediate_size)),
        ("hidden size", str(info.hidden_size)),
        ("vocabulary", str(info.vocab_size)),
        ("neuron = input of", info.neuron_module),
        ("vLLM serving", "supported" if info.serving else "not supported (offline only)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console(width=max(100, Console().width)).print(table)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Prepare and describe models.", no_args_is_help=True)

    @model_app.command("prepare")
    def prepare(
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help=f"{DEFAULT_MODEL!r} or a local transformers checkpoint folder."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (default model only)."),
        force: bool = typer.Option(False, "--force", help="Re-create the prepared checkpoint."),
    ) -> None:
        """Make a model ready for offline use; print its folder and fingerprint."""
        if dtype not in ("float32", "bfloat16"):
            raise KnSteerError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
        typed: Dtype = dtype  # type: ignore[assignment]
        if model == DEFAULT_MODEL:
            prepare_default_model(typed, force=force)
        elif dtype != "float32" or force:
            raise KnSteerError(
                f"--dtype and --force apply to {DEFAULT_MODEL!r} only; {model!r} is used as it is"
            )
        ref = resolve_model(model, typed)
        typer.echo(f"path: {ref.path}")
        typer.echo(f"fingerprint: {ref.fingerprint}")

    @model_app.command("info")
    def info(
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help=f"{DEFAULT_MODEL!r} or a local transformers checkpoint folder."),
        dtype: str = typer.Option("float32", "--dtype", help="Which prepared copy of the default model."),
    ) -> None:
        """Print architecture, layer count, neurons per layer and fingerprint."""
        if dtype not in ("float32", "bfloat16"):
            raise KnSteerError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
        _print_info(model_info(resolve_model(model, dtype)))  # type: ignore[arg-type]

    app.add_typer(model_app, name="model")
