"""``kn-steer model list|prepare|info`` on the named models (already prepared: no dequantizing)."""

from __future__ import annotations

import os
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kn_steer.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_list_names_both_models() -> None:
    out = run("model", "list")
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout


def test_prepare_and_info_gemma_by_name() -> None:
    from kn_steer.models import resolve_model

    ref = resolve_model("gemma3-270m")
    out = run("model", "prepare", "gemma3-270m")
    assert out.returncode == 0, out.stderr
    assert f"path: {ref.path}" in out.stdout and f"fingerprint: {ref.fingerprint}" in out.stdout
    out = run("model", "info", "gemma3-270m")
    assert out.returncode == 0, out.stderr
    for part in ("Gemma3ForCausalLM", "gemma", "18", "2048", "262144", "model.layers.{i}.mlp.down_proj"):
        assert part in out.stdout


def test_two_different_models_is_an_error() -> None:
    out = run("model", "info", "gemma3-270m", "--model", "smollm2-135m")
    assert out.returncode != 0 and "two models" in out.stderr
    out = run("model", "prepare", "gemma-9000")
    assert out.returncode != 0 and "gemma3-270m" in out.stderr and "gemma-9000" in out.stderr
