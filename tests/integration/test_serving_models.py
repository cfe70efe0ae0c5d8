"""Other families, tensor parallelism and start-up refusals, on small random models in real vLLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers.engines import default_ref, make_llm, shutdown, write_test_sets
from helpers.tiny import save_tiny_checkpoint as build

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, skip_tokenizer_init=True,
              enforce_eager=True, seed=0)
PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 1, 64, 33], [9, 8, 7, 6, 5, 4, 3, 2]]
SPECS = [
    None,
    {"interventions": [{"neurons": [[l, i] for l in range(3) for i in range(0, 96, 3)], "op": "clamp", "value": 3.0}]},
    {"interventions": [{"neurons": [[l, i] for l in range(3) for i in range(1, 96, 2)], "op": "scale", "factor": -1.0,
                        "positions": "prompt"}]},
    {"interventions": [{"neurons": [[1, i] for i in range(40, 60)], "op": "clamp", "value": -4.0,
                        "positions": "generated"}]},
    # attention heads on both sides of the TP split (4 heads: 0-1 | 2-3), beside neurons
    {"interventions": [{"heads": [[l, h] for l in range(3) for h in (0, 3)], "op": "scale", "factor": -2.0},
                       {"heads": [[1, 2]], "op": "clamp", "value": 0.5, "positions": "prompt"},
                       {"neurons": [[2, i] for i in range(0, 96, 5)], "op": "scale", "factor": 2.0}]},
    # residual directions (the stream is whole on every TP rank): an add at two layers and an ablation
    {"interventions": [{"direction": [((i * 37) % 11 - 5) / 4.0 for i in range(128)], "op": "add", "alpha": 1.5,
                        "layers": [0, 2]},
                       {"direction": [1.0 if i % 3 == 0 else -0.5 for i in range(128)], "op": "ablate", "layers": [1],
                        "positions": "generated"}]},
]


def reference(model, ids, spec, max_tokens):
    from kn_steer.models.families import ModelShape
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    compiled = compile_spec(spec or {}, {}, ModelShape.from_config(model.config))
    x = torch.tensor([ids])
    with steer(model, compiled, len(ids)), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(l[0], -1)[t].item() for l, t in zip(out.logits, tokens)]


def generate(llm, max_tokens=8):
    from vllm import SamplingParams

    inputs, params = [], []
    for ids in PROMPTS:
        for spec in SPECS:
            inputs.append({"prompt_token_ids": ids})
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True,
                                         extra_args={"kn_steer": spec} if spec else None))
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def read_all(llm):
    """Read neurons on both sides of the TP split (48 | 48) under two specs."""
    from vllm import SamplingParams

    from kn_steer.serving.readback import read_back

    read = {"neurons": [[l, i] for l in range(3) for i in (0, 1, 47, 48, 50, 95)], "positions": "all"}
    specs = [{"read": read}, {**SPECS[1], "read": read}, {**SPECS[3], "read": {**read, "reduce": "mean"}}]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for i in range(3)],
                        [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, extra_args={"kn_steer": s})
                         for s in specs], use_tqdm=False)
    return read_back(llm, outs)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_family_agrees_with_reference(family, tmp_path, monkeypatch):
    model = build(family, tmp_path / family)
    (tmp_path / "sets").mkdir()
    llm = make_llm(tmp_path / family, sets=tmp_path / "sets", **ENGINE)
    try:
        got = generate(llm)
    finally:
        shutdown(llm)
    k = 0
    for ids in PROMPTS:
        plain = None
        for spec in SPECS:
            want, want_lp = reference(model, ids, spec, 8)
            assert got[k][0] == want, (family, ids, spec)
            assert max(abs(a - b) for a, b in zip(got[k][1], want_lp)) < 2e-3
            if spec is None:
                plain = want
            k += 1
        assert any(g[0] != plain for g in got[k - len(SPECS) + 1 : k]), "steering changed nothing"


def test_tensor_parallel_2_matches_tp_1(tmp_path, monkeypatch):
    """Each rank steers its own half of the 96 neurons; TP=2 == TP=1 == the reference."""
    model = build("llama", tmp_path / "llama", seed=1)
    (tmp_path / "sets").mkdir()
    one = make_llm(tmp_path / "llama", sets=tmp_path / "sets", **ENGINE)
    try:
        tp1, read1 = generate(one), read_all(one)
    finally:
        shutdown(one)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    two = make_llm(tmp_path / "llama", sets=tmp_path / "sets", tensor_parallel_size=2, **ENGINE)
    try:
        tp2, read2 = generate(two), read_all(two)
    finally:
        shutdown(two)
    assert [t for t, _ in tp2] == [t for t, _ in tp1]
    # read-back: each rank reads its half of the columns, assembled once == TP=1
    for a, b in zip(read1, read2):
        assert a.neurons.tolist() == b.neurons.tolist() and a.count == b.count
        assert (a.at is None and b.at is None) or a.at.tolist() == b.at.tolist()
        assert not np.isnan(b.values).any()
        np.testing.assert_allclose(b.values, a.values, rtol=1e-4, atol=1e-5)
    assert (read1[1].column(1, 0) == 3.0).all()  # read after the spec's clamp
    k = 0
    for ids in PROMPTS:
        for spec in SPECS:
            assert tp2[k][0] == reference(model, ids, spec, 8)[0]
            k += 1


def test_unsupported_architecture_serves_with_steering_disabled(tmp_path):
    """GPT-2 is not a served family: vLLM serves it as usual, and kn_steer requests get a clear 400."""
    from vllm import SamplingParams

    from kn_steer.errors import SpecError

    build("gpt2", tmp_path / "gpt2")
    (tmp_path / "sets").mkdir()
    llm = make_llm(tmp_path / "gpt2", sets=tmp_path / "sets", **ENGINE)
    try:
        plain = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=4, temperature=0),
                             use_tqdm=False)
        assert len(plain[0].outputs[0].token_ids) == 4
        steered = SamplingParams(max_tokens=4, temperature=0, extra_args={"kn_steer": SPECS[1]})
        with pytest.raises(SpecError, match="steering is not available for this model.*GPT2LMHeadModel"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], steered, use_tqdm=False)
        (status,) = llm.collective_rpc("kn_steer_status")
        assert status["enabled"] is False and status["self_check"] is None
    finally:
        shutdown(llm)


def test_stale_neuron_set_refuses_to_start(tmp_path):
    """A set that claims the served model's name but other weights is stale: start-up stops."""
    from kn_steer.errors import NeuronSetMismatch

    ref, config = default_ref()
    stale = type(ref)(name=ref.name, path=ref.path, fingerprint="sha256:" + "0" * 32)
    folder = write_test_sets(tmp_path / "sets", stale, config,
                             {"stale": ([(0, 1)], {"op": "scale", "factor": 2.0})})
    with pytest.raises(NeuronSetMismatch) as err:
        make_llm(ref.path, sets=folder, dtype="float32", max_model_len=512)
    message = str(err.value)
    assert "refuses to start" in message and "stale" in message and "stale.json" in message
    json.loads((folder / "stale.json").read_text())  # the file itself is fine
