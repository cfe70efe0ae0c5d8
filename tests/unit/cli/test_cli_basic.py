"""The installed ``kn-steer`` command: model info, inspect with a plot, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kn_steer.sets.format import (
    MethodInfo,
    Neuron,
    NeuronSet,
    Operation,
    model_identity,
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kn_steer.cli", *args], capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "160", **__import__("os").environ})


def test_model_info(default_ref) -> None:
    out = run("model", "info")
    assert out.returncode == 0, out.stderr
    for part in ("LlamaForCausalLM", "30", "1536", default_ref.fingerprint):
        assert part in out.stdout


def test_inspect_with_plot(tmp_path: Path, default_ref, default_hf) -> None:
    ns = NeuronSet(name="few", model=model_identity(default_ref, default_hf[0].config),
                   method=MethodInfo(name="manual"), operation=Operation(op="scale", factor=0.0),
                   neurons=[Neuron(layer=3, index=10, score=0.9), Neuron(layer=3, index=11, score=0.2),
                            Neuron(layer=17, index=1500, score=0.5)])
    path = ns.save(tmp_path / "few.json")
    out = run("inspect", str(path), "--top", "2", "--tokens", "3", "--plot", str(tmp_path / "few.png"))
    assert out.returncode == 0, out.stderr
    top_table = out.stdout.split("top 2 neurons")[1]
    assert "neurons per layer" in out.stdout and "1500" in top_table and "0.2 " not in top_table
    assert (tmp_path / "few.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_exits_nonzero(tmp_path: Path) -> None:
    out = run("model", "info", "--model", str(tmp_path / "nowhere"))
    assert out.returncode != 0 and "nowhere" in out.stderr
    (tmp_path / "bad.json").write_text("{}")
    out = run("inspect", str(tmp_path / "bad.json"))
    assert out.returncode != 0 and "bad.json" in out.stderr
