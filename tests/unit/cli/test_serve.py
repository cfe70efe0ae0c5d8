"""``kn-steer serve`` builds vLLM's command line and the plugin's environment (no server started)."""

from __future__ import annotations

import pytest

from kn_steer.cli.serve import ServeOptions, build_command
from kn_steer.errors import KnSteerError


def test_flags_become_the_plugins_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    opts = ServeOptions(sets=tmp_path, port=8123, max_neurons=500, max_abs_factor=10.0, bank_mib=64,
                        extra=["--max-num-seqs", "8"])
    argv, env = build_command(opts)
    assert argv[1:4] == ["-m", "kn_steer.serving.launch", "serve"] and "smollm2-135m" in argv
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[-2:] == ["--max-num-seqs", "8"]
    assert env["KN_STEER_NEURON_SETS"] == str(tmp_path.resolve())
    assert (env["KN_STEER_MAX_NEURONS"], env["KN_STEER_MAX_ABS_FACTOR"], env["KN_STEER_BANK_MIB"]) == ("500", "10.0", "64")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["VLLM_USE_AOT_COMPILE"] == "0"


def test_an_operators_own_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")
    argv, env = build_command(ServeOptions(sets=tmp_path, extra=["--dtype", "bfloat16"]))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "9" and argv.count("--dtype") == 1 and "bfloat16" in argv


def test_bad_flags_are_refused_before_vllm_starts(tmp_path):
    with pytest.raises(KnSteerError, match="KN_STEER_MAX_ABS_VALUE must be between"):
        build_command(ServeOptions(sets=tmp_path, max_abs_value=-1.0))
    with pytest.raises(KnSteerError, match="does not exist"):
        build_command(ServeOptions(sets=tmp_path / "missing"))


def test_presets_flags_become_the_plugins_environment(tmp_path):
    presets = tmp_path / "presets.json"
    presets.write_text('{"presets": {"faithful": {"interventions": [{"set": "s", "factor": 4.0}]}}}')
    _, env = build_command(ServeOptions(sets=tmp_path, presets=presets, set_presets=False))
    assert env["KN_STEER_PRESETS"] == str(presets.resolve()) and env["KN_STEER_SET_PRESETS"] == "0"
    presets.write_text('{"presets": {"faithful": {}}}')
    with pytest.raises(KnSteerError, match="preset 'faithful' has neither interventions nor an experiment"):
        build_command(ServeOptions(sets=tmp_path, presets=presets))
    with pytest.raises(KnSteerError, match="presets file .* does not exist"):
        build_command(ServeOptions(sets=tmp_path, presets=tmp_path / "missing.json"))


def test_read_back_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("KN_STEER_READ_BACK", raising=False)
    _, env = build_command(ServeOptions(sets=tmp_path, max_read_values=5000, read_back=False))
    assert env["KN_STEER_MAX_READ_VALUES"] == "5000" and env["KN_STEER_READ_BACK"] == "0"
    _, env = build_command(ServeOptions(sets=tmp_path))
    assert "KN_STEER_READ_BACK" not in env
    with pytest.raises(KnSteerError, match="KN_STEER_MAX_READ_VALUES must be between"):
        build_command(ServeOptions(sets=tmp_path, max_read_values=0))
