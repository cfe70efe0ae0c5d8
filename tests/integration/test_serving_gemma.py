"""Serving Gemma-3-270M (base; GELU-tanh gated MLP, sliding-window layers, <bos> first) with the plugin.

What marks the gemma3 family as served (kn_steer/models/families.py): greedy tokens and logprobs
equal to the transformers reference under scale and clamp at all / prompt / generated positions,
also for a prompt longer than the 512-token sliding window; concurrent random specs equal to each
alone; compiled == eager with chunked prefill; the prefix cache salted per spec.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers.engines import greedy, make_llm, shutdown

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LAYERS, NEURONS = 18, 2048
STORY = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, and every "
         "morning he wrote down the ships he had seen pass in the night. ")
PROMPTS = ["The capital of France is", "Water boils at a temperature of", STORY * 20 + "The keeper's name was"]
SPECS = {
    "none": None,
    "scale-all": {"interventions": [{"neurons": [[layer, i] for layer in range(LAYERS) for i in range(0, NEURONS, 7)],
                                     "op": "scale", "factor": 0.0}]},
    "clamp-prompt": {"interventions": [{"neurons": [[layer, i] for layer in range(4, 12) for i in range(3, NEURONS, 11)],
                                        "op": "clamp", "value": 2.0, "positions": "prompt"}]},
    "scale-generated": {"interventions": [{"neurons": [[layer, i] for layer in range(10, 18) for i in range(0, NEURONS, 5)],
                                           "op": "scale", "factor": 3.0, "positions": "generated"}]},
    # Gemma-3's heads are 256 wide (4 x 256 = 1024, not the hidden size of 640)
    "heads": {"interventions": [{"heads": [[layer, h] for layer in range(2, 8) for h in (1, 3)], "op": "scale",
                                 "factor": 0.0},
                                {"heads": [[12, 0]], "op": "scale", "factor": 2.5, "positions": "generated"}]},
    # residual directions (640 wide): an add at three layers, an ablation at two
    "directions": {"interventions": [
        {"direction": [((i * 29) % 13 - 6) / 6.0 for i in range(640)], "op": "add", "alpha": 4.0, "layers": [3, 9, 15]},
        {"direction": [1.0 if i % 5 == 0 else -0.25 for i in range(640)], "op": "ablate", "layers": [6, 12]}]},
}
ENGINE = dict(dtype="float32", max_model_len=1280, max_num_seqs=16, seed=0, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def gemma():
    from kn_steer.models import load_hf_model, resolve_model

    ref = resolve_model("gemma3-270m")
    model, tokenizer = load_hf_model(ref)
    return ref, model, tokenizer


@pytest.fixture(scope="module")
def compiled(gemma, tmp_path_factory):
    sets = tmp_path_factory.mktemp("gemma-sets")
    llm = make_llm(gemma[0].path, sets=sets, **ENGINE)
    yield llm
    shutdown(llm)


def _ids(tokenizer, prompt: str) -> list[int]:
    from kn_steer.tokens import prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    assert ids[0] == tokenizer.bos_token_id == 2  # <bos> first on every path
    return ids


def _run(llm, prompts_ids, specs, max_tokens=8, logprobs=None):
    inputs = [{"prompt_token_ids": ids} for ids in prompts_ids]
    return llm.generate(inputs, [greedy(max_tokens, s, logprobs) for s in specs], use_tqdm=False)


def _reference(model, ids, spec, max_tokens):
    from kn_steer.models.families import ModelShape
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    compiled = compile_spec(spec or {}, {}, ModelShape.from_config(model.config))
    x = torch.tensor([ids])
    with steer(model, compiled, prompt_length=len(ids)), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gemma_agrees_with_transformers_reference(compiled, gemma, name):
    _, model, tokenizer = gemma
    for prompt in PROMPTS:
        ids = _ids(tokenizer, prompt)
        (out,) = _run(compiled, [ids], [SPECS[name]], logprobs=0)
        got = list(out.outputs[0].token_ids)
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        want, want_lp = _reference(model, ids, SPECS[name], 8)
        assert got == want, (name, len(ids), got, want)
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 2e-3, (name, got_lp, want_lp)
    assert len(_ids(tokenizer, PROMPTS[2])) > 512  # past the sliding window


def test_gemma_steering_changes_text_and_isolation_holds(compiled, gemma):
    _, _, tokenizer = gemma
    rng = random.Random(7)

    def random_spec(k: int):
        if k % 4 == 0:
            return None
        op = rng.choice([{"op": "scale", "factor": rng.choice([0.0, 3.0])}, {"op": "clamp", "value": 1.5}])
        neurons = [[layer, i] for layer in rng.sample(range(LAYERS), 6) for i in rng.sample(range(NEURONS), 60)]
        return {"interventions": [{"neurons": neurons, **op, "positions": rng.choice(["all", "prompt", "generated"])}]}

    specs = [random_spec(k) for k in range(16)]
    prompts = [_ids(tokenizer, f"Fact {k}: the river that flows through the city is") for k in range(16)]
    together = _run(compiled, prompts, specs, max_tokens=10)
    for k in range(16):
        (alone,) = _run(compiled, [prompts[k]], [specs[k]], max_tokens=10)
        assert together[k].outputs[0].token_ids == alone.outputs[0].token_ids, k
    plain = _run(compiled, prompts, [None] * 16, max_tokens=10)
    assert sum(together[k].outputs[0].token_ids != plain[k].outputs[0].token_ids for k in range(16) if specs[k]) >= 4


def test_gemma_prefix_cache_is_salted(compiled, gemma):
    _, _, tokenizer = gemma
    ids = _ids(tokenizer, PROMPTS[2])
    fresh = {"interventions": [{"neurons": [[3, 5], [9, 700]], "op": "scale", "factor": 2.0}]}  # never run before
    first = _run(compiled, [ids], [SPECS["scale-all"]])[0]
    again = _run(compiled, [ids], [SPECS["scale-all"]])[0]
    other = _run(compiled, [ids], [fresh])[0]
    assert again.num_cached_tokens > 0 and other.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_gemma_read_back_equals_the_reference(compiled, gemma):
    """Read-back on Gemma: values at every position of a prompt longer than the sliding window,
    under a prompt-position clamp, equal the transformers activations after steering."""
    import numpy as np

    from kn_steer.models.families import ModelShape
    from kn_steer.models.sites import hook_site, remove_hooks
    from kn_steer.serving.readback import read_back
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    _, model, tokenizer = gemma
    neurons = [[0, 1], [5, 3], [5, 1000], [11, 2047], [17, 6]]
    spec = {**SPECS["clamp-prompt"], "read": {"neurons": neurons, "positions": "all"}}
    ids = _ids(tokenizer, PROMPTS[2])
    (out,) = _run(compiled, [ids], [spec])
    (got,) = read_back(compiled, [out])
    fed = ids + list(out.outputs[0].token_ids)[:-1]
    seen = {}
    compiled_spec = compile_spec(spec, {}, ModelShape.from_config(model.config))
    with steer(model, compiled_spec, prompt_length=len(ids)), torch.no_grad():
        handles = hook_site(model, lambda layer, rows: seen.__setitem__(layer, rows.detach().float().clone()))
        try:
            model(torch.tensor([fed]))
        finally:
            remove_hooks(handles)
    want = np.stack([seen[l][:, i].numpy() for l, i in neurons], 1)
    assert got.at.tolist() == list(range(len(fed))) and len(ids) > 512
    np.testing.assert_allclose(got.values, want, rtol=1e-3, atol=2e-4)
    assert (got.column(5, 3)[: len(ids)] == 2.0).all() and not (got.column(5, 3)[len(ids):] == 2.0).any()


# keep this test last: it shuts the module's compiled engine down before a second Gemma engine starts
def test_gemma_eager_with_chunked_prefill_matches_compiled(compiled, gemma, tmp_path):
    _, _, tokenizer = gemma
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    specs = [SPECS["scale-all"], SPECS["clamp-prompt"], SPECS["scale-generated"]]
    want = _run(compiled, prompts, specs)
    shutdown(compiled)  # the module's last test: free the compiled engine before a second Gemma engine starts
    eager = make_llm(gemma[0].path, sets=tmp_path, **dict(ENGINE, max_num_seqs=4), enforce_eager=True,
                     max_num_batched_tokens=128)
    try:
        for a, b in zip(want, _run(eager, prompts, specs)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
    finally:
        shutdown(eager)

