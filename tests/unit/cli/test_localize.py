"""``kn-steer localize METHOD``: generated options, per-method help, the deprecated form, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.pararel import write_pararel
from helpers.paths import ROOT
from typer.testing import CliRunner

from kn_steer.cli import app
from kn_steer.cli.localize import parse_localize_command
from kn_steer.localize.command import localize_command
from kn_steer.localize.methods import METHODS
from kn_steer.sets.format import NeuronSet


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kn_steer.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_shows_only_the_methods_own_options() -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    ircan = runner.invoke(app, ["localize", "ircan", "--help"]).output
    relation = runner.invoke(app, ["localize", "relation", "--help"]).output
    for shared in ("--data", "--format", "--out", "--model", "--limit", "--name", "--step-chunk"):
        assert shared in ircan and shared in relation
    assert "--top-k" in ircan and "--relation" not in ircan and "--threshold" not in ircan
    assert "--relation" in relation and "--top-k" not in relation and "--facts-per-relation" in relation
    listing = runner.invoke(app, ["localize", "--help"]).output
    assert all(name in listing for name in METHODS)
    # only methods whose activation pass can run in vLLM offer --backend
    assert "--backend" in relation and "--backend" not in ircan


def test_vllm_backend_is_recorded_and_checked() -> None:
    method = METHODS["relation"]
    params = method.parse_params({"relation": "P36"})
    command = localize_command("relation", params, "d", "pararel", "o.json", backend="vllm")
    assert command.endswith("--backend vllm --out o.json")
    assert parse_localize_command(command)[1]["backend"] == "vllm"
    assert "--backend" not in localize_command("relation", params, "d", "pararel", "o.json")
    bad = _cli("localize", "relation", "--relation", "P36", "--data", "d", "--out", "o.json", "--backend", "vllm",
               "--device-map", "auto")
    assert bad.returncode == 2 and "--backend vllm runs the model in vLLM" in bad.stderr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_recorded_command_parses_back_to_the_same_parameters(name: str) -> None:
    method = METHODS[name]
    required = {"relation": {"relation": "P36"}, "concept": {"word": "dog"}, "language": {"language": "fr"},
                "relation-heads": {"relation": "P36", "layers": [28, 29]},  # a list option, repeated
                "token": {"token": "the"}, "emotion": {"attribute": "valence"}}  # entropy, dead: all defaults
    params = method.parse_params(required.get(name, {}))
    fields = method.params_model.model_fields
    changed = params.model_copy(update={"count": 7} if "count" in fields else {"top": 4} if "top" in fields
                                else {"threshold": 0.3})
    if method.kind == "weights":  # no data options at all
        command = localize_command(name, changed, None, None, "out.json")
        parsed_method, values = parse_localize_command(command)
        assert parsed_method is method and "data" not in values and "limit" not in values
    else:
        command = localize_command(name, changed, "data path/x", method.format_names[0], "out.json", limit=3)
        parsed_method, values = parse_localize_command(command)
        assert parsed_method is method and values["limit"] == 3 and str(values["data"]) == "data path/x"
    assert method.parse_params({k: v for k, v in values.items() if k in method.params_model.model_fields}) == changed


def test_cli_localize_kn(default_ref, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "facts.jsonl", [
        {"id": "paris", "prompts": ["The capital of France is", "France's capital city is"], "target": " Paris"},
    ])
    out = tmp_path / "neuron_sets" / "paris.json"
    done = _cli("localize", "kn", "--data", str(data), "--out", str(out), "--steps", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    written = NeuronSet.load(out)
    assert written.name == "paris" and written.neurons and written.method.params["steps"] == 2
    assert written.model.fingerprint == default_ref.fingerprint and written.operation.factor == 0.0
    # provenance: a command that parses back to these very parameters
    method, values = parse_localize_command(written.provenance.command)
    assert method.name == "kn" and values["steps"] == 2
    assert method.parse_params({k: v for k, v in values.items() if k in method.params_model.model_fields}) \
        == method.params_model.model_validate(written.method.params)


def test_deprecated_method_flag_and_errors(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "facts.jsonl", [{"prompts": ["The capital of France is"]}])
    out = str(tmp_path / "x.json")
    done = _cli("localize", "--method", "kn", "--data", str(data), "--out", out)  # the real exit path
    assert done.returncode == 2 and "deprecated" in done.stderr
    assert "facts.jsonl:1: missing field 'target'" in done.stderr
    runner = CliRunner()
    unknown = runner.invoke(app, ["localize", "nope", "--data", str(data), "--out", out])
    assert ("available: concept, dead, diff-means, emotion, entropy, ircan, kn, kn-consistent, kn-multilingual, language, "
            "relation, relation-heads, token") in str(unknown.exception)
    foreign = runner.invoke(app, ["localize", "kn", "--top-k", "3", "--data", str(data), "--out", out])
    assert foreign.exit_code != 0 and "No such option: --top-k" in foreign.output
    invalid = runner.invoke(app, ["localize", "kn", "--threshold", "7", "--data", str(data), "--out", out])
    assert "invalid parameters for method 'kn'" in str(invalid.exception) and "threshold" in str(invalid.exception)
    fmt = runner.invoke(app, ["localize", "ircan", "--format", "csv", "--data", str(data), "--out", out])
    assert fmt.exit_code != 0 and "'csv' is not one of" in fmt.output and "'memotrap'" in fmt.output


def test_cli_localize_relation(tmp_path: Path) -> None:
    data = write_pararel(tmp_path / "pararel")
    out = tmp_path / "sets" / "p36.json"
    result = CliRunner().invoke(app, ["localize", "relation", "--relation", "P36", "--count", "7",
                                      "--data", str(data), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    ns = NeuronSet.load(out)
    assert len(ns.neurons) == 7 and ns.method.name == "relation" and ns.method.params["relation"] == "P36"
    assert ns.provenance.data_sha256 and ns.provenance.examples == ns.metrics["prompts"]
    bad = CliRunner().invoke(app, ["localize", "relation", "--relation", "P999",
                                   "--data", str(data), "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert bad.exit_code != 0 and "P999" in str(bad.exception or bad.output)
    limited = CliRunner().invoke(app, ["localize", "relation", "--relation", "P36", "--limit", "3",
                                       "--data", str(data), "--out", str(tmp_path / "x.json")])
    assert limited.exit_code != 0 and "--limit does not apply" in str(limited.exception)
