"""Read-back in the real vLLM engine (shared compiled engine, default model, float32): the values
equal the transformers reference's activations of the same neurons at the same positions, after
the request's own steering, alone and in mixed batches, and reading changes no output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.engines import greedy, offline_llm, registry

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NEURONS = [[0, 7], [2, 5], [2, 700], [11, 3], [18, 1036], [29, 808]]
STEER = [{"neurons": [[2, 5], [11, 3], [20, 9]], "op": "clamp", "value": 3.0},
         {"set": "t-boost", "positions": "prompt"}]
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "Once upon a time, in a small village,",
           "The largest planet in our solar system is", "def fibonacci(n):"]
# one mixed batch: reads alone, reads with steering, plain, steered without reading, reductions
SPECS = [
    {"read": {"neurons": NEURONS}},
    {"interventions": STEER, "read": {"neurons": NEURONS, "positions": "all"}},
    None,
    {"interventions": STEER},
    {"read": {"neurons": NEURONS, "positions": "last"}},
    {"interventions": STEER[:1], "read": {"neurons": NEURONS, "positions": "generated", "reduce": "mean"}},
    {"read": {"layers": [11], "positions": "prompt", "reduce": "max"}},
]
TOL = dict(rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def llm():
    return offline_llm()


def _generate(llm, prompts, specs, max_tokens=8):
    from kn_steer.serving.readback import read_back

    outs = llm.generate(prompts, [greedy(max_tokens, s, logprobs=0) for s in specs], use_tqdm=False)
    reading = [o for o, s in zip(outs, specs) if s and "read" in s]
    reads = iter(read_back(llm, reading))
    return outs, [next(reads) if s and "read" in s else None for s in specs]


def _reference(model, ids: list[int], fed: list[int], spec) -> dict[int, torch.Tensor]:
    """Per layer, the site's [positions, units] in transformers, under the spec's steering."""
    from kn_steer.models.families import ModelShape
    from kn_steer.models.sites import hook_site, remove_hooks
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    compiled = compile_spec(spec or {}, registry(), ModelShape.from_config(model.config))
    seen: dict[int, torch.Tensor] = {}

    def record(layer, rows):
        seen[layer] = rows.detach().float().clone()

    with steer(model, compiled, prompt_length=len(ids)), torch.no_grad():
        handles = hook_site(model, record)  # after steer's hooks: sees the steered values
        try:
            model(torch.tensor([ids + fed]))
        finally:
            remove_hooks(handles)
    return seen


def _expected(model, out, spec) -> np.ndarray:
    ids = list(out.prompt_token_ids)
    fed = list(out.outputs[0].token_ids)[:-1]  # the last generated token never passes through the model
    acts = _reference(model, ids, fed, spec)
    read = spec["read"]
    neurons = NEURONS if "neurons" in read else [[11, i] for i in range(acts[11].shape[1])]
    table = np.stack([acts[l][:, i].numpy() for l, i in neurons], 1)  # [all positions, N]
    n = len(ids)
    rows = {"all": table, "prompt": table[:n], "generated": table[n:], "last": table[n - 1: n]}[read.get("positions", "all")]
    return {"none": rows, "mean": rows.mean(0), "max": rows.max(0)}[read.get("reduce", "none")]


def test_reads_equal_the_reference_in_a_mixed_batch(llm, default_hf):
    model, _ = default_hf
    outs, reads = _generate(llm, PROMPTS[:4] + PROMPTS[:3], SPECS)
    assert sum(r is not None for r in reads) == 5
    for out, spec, got in zip(outs, SPECS, reads):
        if got is None:
            continue
        want = _expected(model, out, spec)
        assert got.values.shape == want.shape, spec
        np.testing.assert_allclose(got.values, want, **TOL, err_msg=str(spec))
        n, k = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        if got.reduce == "none":
            assert got.at.tolist() == {"all": list(range(n + k - 1)), "last": [n - 1]}[got.positions]
        else:
            assert got.count == {"generated": k - 1, "prompt": n}[got.positions]
    # read after steering: the clamped neurons read exactly the clamp value at every position
    steered = reads[1]
    assert (steered.column(2, 5) == 3.0).all() and (steered.column(11, 3) == 3.0).all()
    assert not (reads[0].column(2, 5) == 3.0).any()


def test_reading_changes_no_output_and_alone_equals_mixed(llm):
    prompts = PROMPTS[:4] + PROMPTS[:3]
    outs, reads = _generate(llm, prompts, SPECS)
    no_read = [{"interventions": s["interventions"]} if s and "interventions" in s else None for s in SPECS]
    plain_outs, _ = _generate(llm, prompts, no_read)
    for a, b in zip(outs, plain_outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x[t].logprob - y[t].logprob) for x, y, t in
                   zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids)) < 1e-4
    for i in (0, 1, 5):
        _, (alone_read,) = _generate(llm, [prompts[i]], [SPECS[i]])
        np.testing.assert_allclose(alone_read.values, reads[i].values, rtol=1e-5, atol=1e-5)


def test_prompt_reads_bypass_the_prefix_cache(llm, default_hf):
    """A prompt whose KV is cached is still computed for a request that reads its prompt tokens."""
    model, _ = default_hf
    text = ("In a quiet laboratory at the edge of the city, researchers studied how small changes in "
            "temperature affect the growth of crystals. ") * 10 + "The result was"
    spec = {"read": {"neurons": NEURONS, "positions": "prompt"}}
    _generate(llm, [text], [None])
    (warm,), _ = _generate(llm, [text], [None])
    assert warm.num_cached_tokens > 0
    (out,), (got,) = _generate(llm, [text], [spec])
    assert out.num_cached_tokens == 0 and got.at.tolist() == list(range(len(out.prompt_token_ids)))
    np.testing.assert_allclose(got.values, _expected(model, out, spec), **TOL)


@pytest.mark.parametrize("spec, message", [
    ({"read": {"layers": list(range(30))}}, "more than this server's limit of 1000000"),
    ({"read": {"neurons": [[30, 0]]}}, "kn_steer.read.neurons[0]: layer 30 out of range"),
    ({"read": {"sets": ["nope"]}}, "kn_steer.read.sets[0]: unknown neuron set 'nope'"),
    ({"read": {"layers": list(range(5)), "positions": "all"}}, "7680 neurons x up to"),
])
def test_reads_over_the_limits_are_refused_before_the_engine(llm, spec, message):
    from vllm import SamplingParams

    from kn_steer.errors import SpecError

    params = SamplingParams(max_tokens=200, temperature=0, extra_args={"kn_steer": spec})
    with pytest.raises(SpecError) as err:
        llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert message in str(err.value)
    with pytest.raises(SpecError, match="n > 1 is not supported"):
        llm.generate([PROMPTS[0]], SamplingParams(n=2, max_tokens=2, extra_args={"kn_steer": SPECS[0]}),
                     use_tqdm=False)
