"""``kn-steer serve``: serve a model with the plugin through vLLM's own command line.

The plugin itself is loaded by vLLM from the ``vllm.general_plugins`` entry point; this command
only prepares the model, turns its flags into the plugin's environment variables (read in every
vLLM process, see :mod:`kn_steer.serving.settings`) and execs vLLM.

CPU defaults (each overridable): ``--dtype float32`` (this CPU has no fast bfloat16),
``--max-model-len 2048``, a 4 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``; vLLM would otherwise
reserve most of the machine's memory), and ``VLLM_USE_AOT_COMPILE=0`` (vLLM 0.32's CPU build fails
to load its own ahead-of-time compile artifacts and recompiles at every start; the plain compile
cache loads).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from kn_steer.errors import KnSteerError

# Anything after `--` is passed to vLLM and wins over these.
_CPU_FLAGS = {"--dtype": "float32", "--max-model-len": "2048"}
_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_USE_AOT_COMPILE": "0"}


@dataclass
class ServeOptions:
    """``kn-steer serve``'s flags, as the environment the plugin reads."""

    model: str = "smollm2-135m"
    sets: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_neurons: int | None = None
    max_interventions: int | None = None
    max_abs_factor: float | None = None
    max_abs_value: float | None = None
    slots: int | None = None
    bank_mib: float | None = None
    experiments: Path | None = None
    ab_log: Path | None = None
    extra: list[str] = field(default_factory=list)
    presets: Path | None = None
    set_presets: bool = True
    ab_peer_logs: list[Path] = field(default_factory=list)
    max_read_values: int | None = None
    read_back: bool = True
    watch: list[str] = field(default_factory=list)
    watch_threshold: float | None = None

    def environment(self) -> dict[str, str]:
        env = {}
        for name, value in (("KN_STEER_MAX_NEURONS", self.max_neurons),
                            ("KN_STEER_MAX_INTERVENTIONS", self.max_interventions),
                            ("KN_STEER_MAX_ABS_FACTOR", self.max_abs_factor),
                            ("KN_STEER_MAX_ABS_VALUE", self.max_abs_value),
                            ("KN_STEER_SLOTS", self.slots), ("KN_STEER_BANK_MIB", self.bank_mib),
                            ("KN_STEER_MAX_READ_VALUES", self.max_read_values)):
            if value is not None:
                env[name] = str(value)
        if not self.read_back:
            env["KN_STEER_READ_BACK"] = "0"
        if self.watch:
            env["KN_STEER_WATCH"] = ",".join(self.watch)
        if self.watch_threshold is not None:
            env["KN_STEER_WATCH_THRESHOLD"] = str(self.watch_threshold)
        return env


def _on_cpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def build_command(opts: ServeOptions) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for vLLM's ``serve``; the model is resolved/prepared first."""
    from kn_steer.models import resolve_model
    from kn_steer.serving.settings import load_settings
    from kn_steer.sets.registry import ENV_VAR, default_sets_dir

    ref = resolve_model(opts.model)
    env = dict(os.environ)
    folder = (opts.sets or default_sets_dir()).expanduser()
    if not folder.is_dir():
        raise KnSteerError(f"neuron-set folder {folder} does not exist (use --sets DIR)")
    env[ENV_VAR] = str(folder.resolve())
    env.update(opts.environment())
    if opts.experiments is not None:
        if not opts.experiments.is_file():
            raise KnSteerError(f"experiments config {opts.experiments} does not exist")
        env["KN_STEER_EXPERIMENTS"] = str(opts.experiments.expanduser().resolve())
    if opts.ab_log is not None:
        env["KN_STEER_AB_LOG"] = str(opts.ab_log.expanduser().resolve())
    if opts.ab_peer_logs:
        env["KN_STEER_AB_PEER_LOGS"] = os.pathsep.join(str(p.expanduser().resolve()) for p in opts.ab_peer_logs)
    if opts.presets is not None:
        if not opts.presets.is_file():
            raise KnSteerError(f"presets file {opts.presets} does not exist")
        from kn_steer.steering.presets import load_presets_file

        load_presets_file(opts.presets)  # a bad file: one message here, not one per vLLM process
        env["KN_STEER_PRESETS"] = str(opts.presets.expanduser().resolve())
    if not opts.set_presets:
        env["KN_STEER_SET_PRESETS"] = "0"
    env.pop("KN_STEER_DISABLE", None)
    if importlib.util.find_spec("vllm") is None:
        raise KnSteerError("vLLM is not installed: pip install 'kn-steer[cpu]' (or [gpu])")
    saved = dict(os.environ)
    try:  # validate the flags now, with a message, rather than in every vLLM process
        os.environ.clear()
        os.environ.update(env)
        load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    given = {a.split("=")[0] for a in opts.extra if a.startswith("--")}
    defaults: list[str] = []
    if _on_cpu():
        for flag, value in _CPU_FLAGS.items():
            if flag not in given:
                defaults += [flag, value]
        for name, value in _CPU_ENV.items():
            env.setdefault(name, value)
    # Through kn-steer's launcher: the `vllm` script of the CPU wheel cannot start (see launch.py).
    argv = [sys.executable, "-m", "kn_steer.serving.launch", "serve", str(ref.path), "--served-model-name", ref.name,
            "--host", opts.host, "--port", str(opts.port), *defaults, *opts.extra]
    return argv, env


def register(app: typer.Typer) -> None:
    @app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve(
        ctx: typer.Context,
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="A prepared model name or a model folder."),
        sets: Optional[Path] = typer.Option(None, "--sets", help="Neuron-set folder (default: neuron_sets/ or $KN_STEER_NEURON_SETS)."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
        max_neurons: Optional[int] = typer.Option(None, "--max-neurons", help="Distinct neurons one request may touch (200000)."),
        max_interventions: Optional[int] = typer.Option(None, "--max-interventions", help="Interventions per request (64)."),
        max_abs_factor: Optional[float] = typer.Option(None, "--max-abs-factor", help="Largest |scale factor| after composition (100; float16 models are refused)."),
        max_abs_value: Optional[float] = typer.Option(None, "--max-abs-value", help="Largest |clamp value| (1e4)."),
        slots: Optional[int] = typer.Option(None, "--slots", help="Mask slots per worker (default: from --bank-mib)."),
        bank_mib: Optional[float] = typer.Option(None, "--bank-mib", help="Memory for mask slots per worker (256)."),
        experiments: Optional[Path] = typer.Option(None, "--experiments", help="A/B experiments config (JSON)."),
        ab_log: Optional[Path] = typer.Option(None, "--ab-log", help="A/B assignment log (JSONL)."),
        ab_peer_log: list[Path] = typer.Option([], "--ab-peer-log", help="Another replica's A/B log (repeatable): outcomes for its requests may be posted here."),
        presets: Optional[Path] = typer.Option(None, "--presets", help="Presets file (JSON): named specs, each served as the model id MODEL+NAME."),
        set_presets: bool = typer.Option(True, "--set-presets/--no-set-presets", help="Serve every neuron set as a preset of its name (MODEL+SET)."),
        max_read_values: Optional[int] = typer.Option(None, "--max-read-values", help="Neuron values one request may read back, rows x neurons (1000000)."),
        read_back: bool = typer.Option(True, "--read-back/--no-read-back", help="Let requests read neuron values back (kn_steer.read)."),
        watch: list[str] = typer.Option([], "--watch", help="Keep live statistics of this set's neurons per A/B arm (repeatable; 'all': every neuron)."),
        watch_threshold: Optional[float] = typer.Option(None, "--watch-threshold", help="A watched neuron fires above this value (0)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the vLLM command and exit."),
    ) -> None:
        """Serve MODEL with per-request neuron steering (extra args after `--` go to `vllm serve`)."""
        opts = ServeOptions(model, sets, host, port, max_neurons, max_interventions, max_abs_factor, max_abs_value,
                            slots, bank_mib, experiments, ab_log, list(ctx.args), presets, set_presets, ab_peer_log,
                            max_read_values, read_back, watch, watch_threshold)
        argv, env = build_command(opts)
        if dry_run:
            typer.echo(" ".join(argv))
            return
        typer.echo(f"kn-steer: {' '.join(argv)}", err=True)
        os.execve(argv[0], argv, env)
