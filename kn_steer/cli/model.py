"""``kn-steer model list|prepare|info``: the named models, making one usable offline, describing one.

``info`` reads only the config and weights files (no full model load), so it is quick; ``prepare``
dequantizes a named model's GGUF once (a minute or two).
"""

from __future__ import annotations

from dataclasses import dataclass

import typer

from kn_steer.errors import KnSteerError
from kn_steer.models import (
    CATALOG,
    DEFAULT_MODEL,
    IDENTITY_FILE,
    Dtype,
    ModelRef,
    prepare_model,
    prepared_path,
    resolve_model,
)

_MODEL_HELP = f"A named model ({', '.join(CATALOG)}) or a local transformers checkpoint folder."


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


def _dtype(value: str) -> Dtype:
    if value not in ("float32", "bfloat16"):
        raise KnSteerError(f"--dtype must be float32 or bfloat16, not {value!r}")
    return value  # type: ignore[return-value]


def _pick(positional: str | None, option: str | None) -> str:
    """``kn-steer model prepare gemma3-270m`` and ``--model gemma3-270m`` mean the same."""
    if positional and option and positional != option:
        raise KnSteerError(f"two models given: {positional!r} and --model {option!r}")
    return positional or option or DEFAULT_MODEL


def _print_catalog() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="named models (kn-steer model prepare NAME)")
    for column in ("name", "description", "package installed", "prepared (float32)", "licence"):
        table.add_column(column)
    for entry in CATALOG.values():
        prepared = (prepared_path(entry.name) / IDENTITY_FILE).is_file()
        installed = "yes" if entry.source.available() else f"no: {entry.source.install_hint()}"
        table.add_row(entry.name, entry.description, installed, "yes" if prepared else "no",
                      entry.licence)
    Console(width=max(120, Console().width)).print(table)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Prepare and describe models.", no_args_is_help=True)

    @model_app.command("list")
    def list_models() -> None:
        """The named models, whether their package is installed and whether they are prepared."""
        _print_catalog()

    @model_app.command("prepare")
    def prepare(
        name: str = typer.Argument(None, help=_MODEL_HELP, show_default=False),
        model: str = typer.Option(None, "--model", "-m", help=_MODEL_HELP, show_default=False),
        dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (named models only)."),
        force: bool = typer.Option(False, "--force", help="Re-create the prepared checkpoint."),
    ) -> None:
        """Make a model ready for offline use; print its folder and fingerprint."""
        chosen, typed = _pick(name, model), _dtype(dtype)
        if chosen in CATALOG:
            prepare_model(chosen, typed, force=force)
        elif dtype != "float32" or force:
            raise KnSteerError(
                f"--dtype and --force apply to named models only; {chosen!r} is used as it is"
            )
        ref = resolve_model(chosen, typed)
        typer.echo(f"path: {ref.path}")
        typer.echo(f"fingerprint: {ref.fingerprint}")

    @model_app.command("info")
    def info(
        name: str = typer.Argument(None, help=_MODEL_HELP, show_default=False),
        model: str = typer.Option(None, "--model", "-m", help=_MODEL_HELP, show_default=False),
        dtype: str = typer.Option("float32", "--dtype", help="Which prepared copy of a named model."),
    ) -> None:
        """Print architecture, layer count, neurons per layer and fingerprint."""
        _print_info(model_info(resolve_model(_pick(name, model), _dtype(dtype))))

    app.add_typer(model_app, name="model")
