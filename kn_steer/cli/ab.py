"""``kn-steer ab report|outcome|offline|check``: read and extend A/B logs, run arms offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kn_steer.errors import KnSteerError


def register(app: typer.Typer) -> None:
    ab = typer.Typer(help="A/B experiments: reports, outcomes, offline runs over labelled data.",
                     no_args_is_help=True)

    @ab.command("report")
    def report(
        log: Path = typer.Option(..., "--log", help="Assignment log (JSONL) written by the server or `ab offline`."),
        experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
        config: Optional[Path] = typer.Option(None, "--config", help="Experiments config: arm order and control arm."),
        control: Optional[str] = typer.Option(None, "--control", help="Arm to compare against (overrides the config)."),
        confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the intervals."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the statistics as JSON here."),
    ) -> None:
        """Per-arm outcome rates with confidence intervals and a significance test against control."""
        from kn_steer.ab.config import load_config
        from kn_steer.ab.report import build_report, render, save_json
        from kn_steer.ab.report import plot as make_plot

        cfg = load_config(config) if config is not None else None
        reports = build_report(log, experiment, cfg, control, confidence)
        render(reports)
        if json_out is not None:
            typer.echo(f"wrote {save_json(reports, json_out)}")
        if plot is not None:
            typer.echo(f"wrote {make_plot(reports, plot)}")

    @ab.command("outcome")
    def outcome(
        request_id: str = typer.Argument(..., help="The request id (the response's `id`)."),
        value: str = typer.Argument(..., help="true/false (success/failure) or a number (use `--` before a negative one)."),
        log: Path = typer.Option(..., "--log", help="Assignment log the request was recorded in."),
    ) -> None:
        """Attach an outcome to a logged request (appended to the log; the last one counts)."""
        from kn_steer.ab.log import AssignmentLog, known_request_ids, parse_outcome_text

        parsed = parse_outcome_text(value)
        if not log.exists():
            raise KnSteerError(f"log {log} does not exist")
        from kn_steer.ab.service import RESPONSE_ID_PREFIXES

        known = known_request_ids(log)
        candidates = [request_id] + [request_id[len(p):] for p in RESPONSE_ID_PREFIXES if request_id.startswith(p)]
        logged = next((c for c in candidates if c in known), None)
        if logged is None:
            raise KnSteerError(f"unknown request id {request_id!r}: no assignment with that id in {log}")
        AssignmentLog(log).add_outcome(logged, parsed, source="cli")
        request_id = logged
        typer.echo(f"{request_id}: outcome {parsed!r} recorded in {log}")

    @ab.command("offline")
    def offline(
        config: Path = typer.Option(..., "--config", help="Experiments config (JSON)."),
        experiment: str = typer.Option(..., "--experiment", "-e", help="Experiment whose arms to run."),
        data: Path = typer.Option(..., "--data", help="Labelled dataset file."),
        fmt: str = typer.Option(..., "--format", help="memotrap or kre."),
        server: str = typer.Option("http://127.0.0.1:8000", "--server", help="Base URL of a running kn-steer server."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N items."),
        log: Optional[Path] = typer.Option(None, "--log", help="Log to write (default: ab-offline-EXPERIMENT.jsonl)."),
        concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight."),
        model: Optional[str] = typer.Option(None, "--model", help="Served model name (default: the first served)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the statistics as JSON here."),
    ) -> None:
        """Run every arm over a labelled dataset through the server, log outcomes and report."""
        from tqdm import tqdm

        from kn_steer.ab.config import load_config
        from kn_steer.ab.offline import load_items, run_offline
        from kn_steer.ab.report import build_report, render, save_json
        from kn_steer.ab.report import plot as make_plot

        if fmt not in ("memotrap", "kre"):
            raise KnSteerError(f"--format must be memotrap or kre, not {fmt!r}")
        cfg = load_config(config)
        exp = cfg.get(experiment)
        items = load_items(data, fmt, limit)  # type: ignore[arg-type]
        log_path = log or Path(f"ab-offline-{exp.name}.jsonl")
        bar = tqdm(total=len(items) * len(exp.arms), desc=f"{exp.name}", unit="item")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        counts = run_offline(exp, items, server, log_path, concurrency, model, progress)
        bar.close()
        typer.echo(f"{counts['run']} scored, {counts['skipped']} already in {log_path}")
        reports = build_report(log_path, exp.name, cfg)
        render(reports)
        if json_out is not None:
            typer.echo(f"wrote {save_json(reports, json_out)}")
        if plot is not None:
            typer.echo(f"wrote {make_plot(reports, plot)}")

    @ab.command("check")
    def check(
        config: Path = typer.Option(..., "--config", help="Experiments config (JSON)."),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model the server will serve."),
        sets: Optional[Path] = typer.Option(None, "--sets", help="Neuron-set folder (default: $KN_STEER_NEURON_SETS or neuron_sets/)."),
    ) -> None:
        """Validate a config against a model and neuron-set folder, as the server does at start."""
        from transformers import AutoConfig

        from kn_steer.ab.config import load_config, validate_specs
        from kn_steer.models import resolve_model
        from kn_steer.models.families import ModelShape
        from kn_steer.sets.format import model_identity
        from kn_steer.sets.registry import NeuronSetRegistry

        cfg = load_config(config)
        ref = resolve_model(model)
        hf_config = AutoConfig.from_pretrained(ref.path)
        registry = NeuronSetRegistry.load(sets, model_identity(ref, hf_config))
        validate_specs(cfg, registry, ModelShape.from_config(hf_config), source=str(config))
        for exp in cfg.experiments:
            shares = ", ".join(f"{a['name']} {a['share']:.0%}" for a in exp.describe()["arms"])
            typer.echo(f"{exp.name}: {shares} (control: {exp.control_arm})")
        typer.echo("ok")

    app.add_typer(ab, name="ab")
