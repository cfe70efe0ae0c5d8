"""``kn-steer ab report|outcome|offline|check``: read and extend A/B logs, run arms offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kn_steer.errors import KnSteerError


def _show(reports: list, json_out: Path | None, plot: Path | None) -> None:
    """Print the reports; write their JSON and plot where asked."""
    from kn_steer.ab.report import plot as make_plot
    from kn_steer.ab.report import render, save_json

    render(reports)
    if json_out is not None:
        typer.echo(f"wrote {save_json(reports, json_out)}")
    if plot is not None:
        typer.echo(f"wrote {make_plot(reports, plot)}")


def register(app: typer.Typer) -> None:
    ab = typer.Typer(help="A/B experiments: reports, outcomes, offline runs over labelled data.",
                     no_args_is_help=True)

    @ab.command("report")
    def report(
        log: list[Path] = typer.Option(..., "--log", help="Assignment log (JSONL) written by the server or `ab "
                                                            "offline`; repeat it to read several replicas' logs as one."),
        experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
        config: Optional[Path] = typer.Option(None, "--config", help="Experiments config: arm order and control arm."),
        control: Optional[str] = typer.Option(None, "--control", help="Arm to compare against (overrides the config)."),
        confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the intervals."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the statistics as JSON here."),
    ) -> None:
        """Per-arm outcome rates with confidence intervals and a significance test against control."""
        from kn_steer.ab.config import load_config
        from kn_steer.ab.report import build_report

        cfg = load_config(config) if config is not None else None
        _show(build_report(log, experiment, cfg, control, confidence), json_out, plot)

    @ab.command("outcome")
    def outcome(
        request_id: str = typer.Argument(..., help="The response's `id` (cmpl-...), or the X-Request-Id header "
                                                   "the request was sent with, or its id in the log."),
        value: str = typer.Argument(..., help="true/false (success/failure) or a number (use `--` before a negative one)."),
        log: Path = typer.Option(..., "--log", help="Assignment log the outcome is written to."),
        config: Optional[Path] = typer.Option(None, "--config", help="Experiments config: declared outcome types and ranges."),
        peer_log: list[Path] = typer.Option([], "--peer-log", help="Another replica's log, read to find the request (repeatable)."),
    ) -> None:
        """Attach an outcome to a logged request (appended to the log; the last one counts).

        The outcome must have the experiment's type: the one its config declares, else the type of
        its first outcome (a number for a true/false experiment is refused, and the reverse).
        """
        from kn_steer.ab.config import load_config
        from kn_steer.ab.log import parse_outcome_text
        from kn_steer.ab.outcomes import ledger_for

        parsed = parse_outcome_text(value)
        ledger = ledger_for(log, load_config(config) if config is not None else None, peer_log)
        record = ledger.attach(request_id, parsed, source="cli")
        typer.echo(f"{record['request_id']}: outcome {parsed!r} recorded in {log}")

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
        from kn_steer.ab.report import build_report

        if fmt not in ("memotrap", "kre"):
            raise KnSteerError(f"--format must be memotrap or kre, not {fmt!r}")
        cfg = load_config(config)
        exp = cfg.get(experiment)
        if exp.outcome == "numeric":
            raise KnSteerError(f"experiment {exp.name!r} declares numeric outcomes; offline runs score "
                               "each item true/false (the context-faithful choice wins or not)")
        items = load_items(data, fmt, limit)  # type: ignore[arg-type]
        log_path = log or Path(f"ab-offline-{exp.name}.jsonl")
        bar = tqdm(total=len(items) * len(exp.arms), desc=f"{exp.name}", unit="item")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        counts = run_offline(exp, items, server, log_path, concurrency, model, progress)
        bar.close()
        typer.echo(f"{counts['run']} scored, {counts['skipped']} already in {log_path}")
        _show(build_report(log_path, exp.name, cfg), json_out, plot)

    @ab.command("check")
    def check(
        config: Path = typer.Option(..., "--config", help="Experiments config (JSON)."),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model the server will serve."),
        sets: Optional[Path] = typer.Option(None, "--sets", help="Neuron-set folder (default: $KN_STEER_NEURON_SETS or neuron_sets/)."),
    ) -> None:
        """Validate a config against a model and neuron-set folder, as the server does at start."""
        from transformers import AutoConfig

        from kn_steer.ab.config import arm_doses, load_config, validate_specs
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
            outcome = exp.outcome or "set by the first outcome"
            if exp.outcome_range is not None:
                outcome += " in [{:g}, {:g}]".format(*exp.outcome_range)
            typer.echo(f"{exp.name}: {shares} (control: {exp.control_arm}; outcomes: {outcome})")
            for arm in exp.arms:  # what each arm really does, set defaults filled in
                doses = "; ".join(str(d) for d in arm_doses(arm, registry)) or "no steering"
                typer.echo(f"  {arm.name}: {doses}")
        typer.echo("ok")

    app.add_typer(ab, name="ab")
