"""``kn-steer serve``: serve a model with the plugin through plain ``vllm serve``.

The plugin itself is loaded by vLLM from the ``vllm.general_plugins`` entry point; this command
only prepares the model, turns its flags into the plugin's environment variables and execs vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kn_steer.errors import KnSteerError

# CPU-friendly defaults; anything after `--` is passed to vLLM and wins over these.
_CPU_DEFAULTS = ["--dtype", "float32", "--max-model-len", "2048"]


def build_command(
    model: str, sets: Path | None, host: str, port: int, max_neurons: int | None,
    slots: int | None, extra: list[str], experiments: Path | None = None, ab_log: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for ``vllm serve``; the model is resolved/prepared first."""
    from kn_steer.models import resolve_model
    from kn_steer.sets.registry import ENV_VAR, default_sets_dir

    ref = resolve_model(model)
    env = dict(os.environ)
    folder = (sets or default_sets_dir()).expanduser()
    if not folder.is_dir():
        raise KnSteerError(f"neuron-set folder {folder} does not exist (use --sets DIR)")
    env[ENV_VAR] = str(folder.resolve())
    if max_neurons is not None:
        env["KN_STEER_MAX_NEURONS"] = str(max_neurons)
    if slots is not None:
        env["KN_STEER_SLOTS"] = str(slots)
    if experiments is not None:
        if not experiments.is_file():
            raise KnSteerError(f"experiments config {experiments} does not exist")
        env["KN_STEER_EXPERIMENTS"] = str(experiments.expanduser().resolve())
    if ab_log is not None:
        env["KN_STEER_AB_LOG"] = str(ab_log.expanduser().resolve())
    env.pop("KN_STEER_DISABLE", None)
    if importlib.util.find_spec("vllm") is None:
        raise KnSteerError("vLLM is not installed: pip install 'kn-steer[cpu]' (or [gpu])")
    given = {a.split("=")[0] for a in extra if a.startswith("--")}
    defaults: list[str] = []
    for flag, value in zip(_CPU_DEFAULTS[::2], _CPU_DEFAULTS[1::2]):
        if flag not in given:
            defaults += [flag, value]
    # Through kn-steer's launcher: the `vllm` script of the CPU wheel cannot start (see launch.py).
    argv = [sys.executable, "-m", "kn_steer.serving.launch", "serve", str(ref.path), "--served-model-name", ref.name,
            "--host", host, "--port", str(port), *defaults, *extra]
    return argv, env


def register(app: typer.Typer) -> None:
    @app.command(
        "serve",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def serve(
        ctx: typer.Context,
        model: str = typer.Option("smollm2-135m", help="'smollm2-135m' or a model folder"),
        sets: Optional[Path] = typer.Option(None, help="neuron-set folder (default: neuron_sets/ or $KN_STEER_NEURON_SETS)"),
        host: str = typer.Option("127.0.0.1"),
        port: int = typer.Option(8000),
        max_neurons: Optional[int] = typer.Option(None, help="most neurons one request may touch"),
        slots: Optional[int] = typer.Option(None, help="mask slots per layer (default 2*max_num_seqs+1)"),
        experiments: Optional[Path] = typer.Option(None, help="A/B experiments config (JSON); sets $KN_STEER_EXPERIMENTS"),
        ab_log: Optional[Path] = typer.Option(None, help="A/B assignment log (JSONL); sets $KN_STEER_AB_LOG"),
        dry_run: bool = typer.Option(False, help="print the vLLM command and exit"),
    ) -> None:
        """Serve MODEL with per-request neuron steering (extra args after `--` go to `vllm serve`)."""
        extra: List[str] = list(ctx.args)
        argv, env = build_command(
            model, sets, host, port, max_neurons, slots, extra, experiments, ab_log
        )
        if dry_run:
            typer.echo(" ".join(argv))
            return
        typer.echo(f"kn-steer: {' '.join(argv)}", err=True)
        os.execve(argv[0], argv, env)
