"""``kn-steer localize ... --workers N [--address A]``: the CLI's Ray path and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT
from helpers.tiny import save_tiny_checkpoint
from helpers.tokenizer import word_tokenizer
from helpers.workers import assert_close, assert_same_neurons
from typer.testing import CliRunner

from kn_steer.cli import app
from kn_steer.localize.runner import examples_path
from kn_steer.sets.format import NeuronSet

QUOTE = 'write a quote that ends in the word "{}": '
ROWS = [
    {"id": "m0", "context": QUOTE.format("kings"), "prompt": "no man can serve two", "target": " kings"},
    {"id": "m1", "context": QUOTE.format("wise"), "prompt": "penny wise , pound", "target": " wise"},
    {"id": "m2", "context": QUOTE.format("masters"), "prompt": "no man can serve two", "target": " masters"},
    {"id": "c0", "context": "the capital of france is rome . ", "prompt": "the capital of france is",
     "target": " rome"},
]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kn_steer.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "tiny-llama"
    save_tiny_checkpoint("llama", model)
    word_tokenizer().save_pretrained(model)
    data = tmp_path / "ctx.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model, data


def _per_example(out: Path) -> dict:
    lines = examples_path(out).read_text().splitlines()
    return {entry["id"]: entry["result"] for entry in map(json.loads, lines[1:])}


@pytest.mark.slow
def test_cli_two_workers_write_the_one_process_set(tmp_path: Path) -> None:
    model, data = _setup(tmp_path)
    args = ["localize", "ircan", "--data", str(data), "--model", str(model), "--steps", "3", "--top-k", "5",
            "--count", "6", "--no-progress"]
    one = tmp_path / "one" / "ctx.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-CPU Ray worker's thread count: the same summation order
    try:
        done = CliRunner().invoke(app, [*args, "--out", str(one)])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output
    # the real exit path: a local Ray cluster started for the run and stopped after it
    two = tmp_path / "two" / "ctx.json"
    ran = _cli(*args, "--workers", "2", "--out", str(two))
    assert ran.returncode == 0, ran.stderr
    assert f"wrote {two}: 6 neurons from 4 examples" in ran.stdout
    a, b = NeuronSet.load(one), NeuronSet.load(two)
    assert_same_neurons(a, b)
    assert a.model == b.model and a.method == b.method
    # the recorded command reproduces the set without Ray (workers do not change the result)
    assert b.provenance.command == a.provenance.command.replace(str(one), str(two))
    assert "--workers" not in b.provenance.command
    assert_close(_per_example(one), _per_example(two))


def test_cli_refuses_bad_worker_options(tmp_path: Path) -> None:
    data = tmp_path / "ctx.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    out = str(tmp_path / "x.json")
    runner = CliRunner()
    zero = runner.invoke(app, ["localize", "ircan", "--data", str(data), "--out", out, "--workers", "0"])
    message = " ".join(zero.output.replace("│", " ").split())
    assert zero.exit_code == 2 and "--workers" in message and "greater than or equal to 1" in message
    alone = runner.invoke(app, ["localize", "ircan", "--data", str(data), "--out", out, "--address", "auto"])
    assert alone.exit_code != 0 and "--address needs --workers N" in str(alone.exception)
    corpus = runner.invoke(app, ["localize", "relation", "--relation", "P36", "--data", str(tmp_path),
                                 "--format", "pararel", "--out", out, "--workers", "2"])
    assert corpus.exit_code != 0 and "'relation' is a corpus method" in str(corpus.exception)
    assert not Path(out).exists()


def test_cli_without_ray_says_how_to_install_it(tmp_path: Path) -> None:
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named \'ray\'")\n')
    data = tmp_path / "ctx.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    path = os.pathsep.join(p for p in (str(fake.parent), os.environ.get("PYTHONPATH")) if p)
    done = _cli("localize", "ircan", "--data", str(data), "--out", str(tmp_path / "x.json"),
                "--workers", "2", "--address", "auto", env={"PYTHONPATH": path})
    assert done.returncode == 2, done.stderr
    assert "need Ray: pip install 'kn-steer[ray]'" in done.stderr and "Traceback" not in done.stderr
