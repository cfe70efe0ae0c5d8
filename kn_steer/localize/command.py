"""The ``kn-steer localize`` invocation that reproduces a run, and the option names it uses.

Every set written by the library (from the CLI or an evaluation protocol) records this command in
``provenance.command``. It names the method, the data, the format and **every** method parameter
(defaults included), so it reproduces the set even if a default changes later. Option names come
from the parameter model's field names (``top_k`` -> ``--top-k``); the CLI generates its options
with the same mapping (:mod:`kn_steer.cli.localize`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kn_steer.models.checkpoints import DEFAULT_MODEL


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def negative_option_name(field: str) -> str:
    return "--no-" + field.replace("_", "-")


def param_arguments(params: BaseModel) -> list[str]:
    """``--name value`` for every parameter (booleans as ``--flag`` / ``--no-flag``; a list as the
    option repeated; None left out)."""
    args: list[str] = []
    for field, value in params.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(option_name(field) if value else negative_option_name(field))
        elif isinstance(value, list):  # a list option is repeated
            for item in value:
                args += [option_name(field), repr(item) if isinstance(item, float) else str(item)]
        else:
            args += [option_name(field), repr(value) if isinstance(value, float) else str(value)]
    return args


def model_argument(ref: Any) -> str:
    """What ``--model`` takes to load ``ref`` again: its catalog name, else its folder."""
    from kn_steer.models.catalog import catalog_model

    return ref.name if catalog_model(ref.name) is not None else str(ref.path)


def localize_command(method: str, params: BaseModel, data: str | Path | None, format: str | None, out: str | Path,
                     *, model: str = DEFAULT_MODEL, dtype: str = "float32", limit: int | None = None,
                     name: str | None = None, backend: str = "hf") -> str:
    """The shell command that reruns this localization (paths as given; no data for a weights method)."""
    args: list[Any] = ["kn-steer", "localize", method]
    if data is not None:
        args += ["--data", str(data), "--format", str(format)]
    if limit is not None:
        args += ["--limit", str(limit)]
    args += param_arguments(params)
    if model != DEFAULT_MODEL:
        args += ["--model", model]
    if dtype != "float32":
        args += ["--dtype", dtype]
    if backend != "hf":
        args += ["--backend", backend]
    if name is not None:
        args += ["--name", name]
    args += ["--out", str(out)]
    return shlex.join(args)
