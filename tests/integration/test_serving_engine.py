"""The plugin in the real vLLM engine (offline ``vllm.LLM``) on the real default model, float32.

One shared compiled engine (vLLM's default CPU compilation mode) serves most tests; a second
engine with ``enforce_eager`` and a tiny token budget (chunked prefill) checks that both give the
same steered text. Outputs are compared with the transformers reference intervention.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers.engines import (
    ENGINE_KW,
    default_ref,
    greedy,
    make_llm,
    offline_llm,
    registry,
    shutdown,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The largest planet in our solar system is",
]
def _unit_vector(seed: int, size: int = 576) -> list[float]:
    v = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm()).tolist()


DIRECTION, OTHER_DIRECTION = _unit_vector(0), _unit_vector(1)
SPECS = {
    "silence": {"interventions": [{"set": "t-silence"}]},
    "boost-prompt": {"interventions": [{"set": "t-boost", "positions": "prompt"}]},
    "clamp-generated": {"interventions": [{"set": "t-clamp", "positions": "generated"}]},
    "explicit-clamp": {"interventions": [{"neurons": [[l, i] for l in range(2, 20) for i in range(0, 1536, 13)],
                                          "op": "clamp", "value": 1.5}]},
    "compose": {"interventions": [{"set": "t-boost"}, {"set": "t-clamp", "factor": None},
                                  {"neurons": [[3, 5], [7, 9]], "op": "scale", "factor": 0.5}]},
    "heads-ablate": {"interventions": [{"heads": [[l, h] for l in (2, 3, 4) for h in range(9)], "op": "scale",
                                        "factor": 0.0}]},
    "heads-and-neurons": {"interventions": [{"set": "t-boost", "positions": "prompt"},
                                            {"heads": [[1, 0], [5, 4], [5, 8]], "op": "scale", "factor": 3.0},
                                            {"heads": [[0, 2], [0, 3]], "op": "clamp", "value": 0.5,
                                             "positions": "generated"}]},
    "direction-add": {"interventions": [{"direction": DIRECTION, "op": "add", "alpha": 12.0, "layers": [3, 10]}]},
    "direction-ablate": {"interventions": [{"direction": DIRECTION, "op": "ablate", "layers": list(range(30))},
                                           {"direction": OTHER_DIRECTION, "op": "add", "alpha": 6.0, "layers": [20],
                                            "positions": "generated"}]},
    "everything": {"interventions": [{"set": "t-boost", "positions": "prompt"},
                                     {"heads": [[1, 0], [5, 4]], "op": "scale", "factor": 2.0},
                                     {"direction": DIRECTION, "op": "ablate", "layers": [2, 4]},
                                     {"direction": OTHER_DIRECTION, "op": "add", "alpha": -8.0, "layers": [6]}]},
}


@pytest.fixture(scope="module")
def llm():
    return offline_llm()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_ref()[0].path)


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def _run(llm, prompts_ids, specs, max_tokens=10, logprobs=None):
    inputs = [{"prompt_token_ids": ids} for ids in prompts_ids]
    params = [greedy(max_tokens, s, logprobs) for s in specs]
    return llm.generate(inputs, params, use_tqdm=False)


def _reference(model, ids, spec, max_tokens):
    from kn_steer.models.families import ModelShape
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.reference import steer

    compiled = compile_spec(spec or {}, registry(), ModelShape.from_config(model.config))
    x = torch.tensor([ids])
    with steer(model, compiled, prompt_length=len(ids)), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, logprobs


def test_steering_changes_output_under_default_compile_mode(llm, tokenizer):
    """The hooks are traced into the compiled graph: steered text differs, unsteered does not."""
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # not eager
    ids = _ids(tokenizer, PROMPTS[0])
    plain, steered, plain2 = _run(llm, [ids] * 3, [None, SPECS["silence"], None])
    assert plain.outputs[0].token_ids == plain2.outputs[0].token_ids
    assert steered.outputs[0].token_ids != plain.outputs[0].token_ids


@pytest.mark.parametrize("name", ["none", "silence", "boost-prompt", "clamp-generated", "explicit-clamp", "compose",
                                  "heads-ablate", "heads-and-neurons", "direction-add", "direction-ablate",
                                  "everything"])
def test_agrees_with_transformers_reference(llm, tokenizer, default_hf, name):
    model, _ = default_hf
    spec = SPECS.get(name)
    for prompt in PROMPTS[:3]:
        ids = _ids(tokenizer, prompt)
        (out,) = _run(llm, [ids], [spec], max_tokens=10, logprobs=0)
        got = list(out.outputs[0].token_ids)
        got_lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        want, want_lp = _reference(model, ids, spec, 10)
        assert got == want, (name, prompt, got, want)
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 2e-3, (name, got_lp, want_lp)


def _random_spec(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 7:  # residual directions, beside neurons or alone
        layers = sorted(rng.sample(range(30), rng.randrange(1, 6)))
        ivs = [{"direction": _unit_vector(rng.randrange(100)), "op": "add", "alpha": round(rng.uniform(-20, 20), 2),
                "layers": layers, "positions": rng.choice(["all", "prompt", "generated"])},
               {"direction": _unit_vector(rng.randrange(100)), "op": "ablate", "layers": layers[:1]}]
        return {"interventions": ivs + ([{"set": "t-silence"}] if rng.random() < 0.5 else [])}
    if kind == 6:  # attention heads, beside neurons or alone
        heads = sorted({(rng.randrange(30), rng.randrange(9)) for _ in range(rng.randrange(3, 40))})
        ivs = [{"heads": [list(h) for h in heads], "op": "scale", "factor": round(rng.uniform(-1, 3), 3),
                "positions": rng.choice(["all", "prompt", "generated"])}]
        return {"interventions": ivs + ([{"set": "t-boost"}] if rng.random() < 0.5 else [])}
    if kind == 1:
        return {"interventions": [{"set": rng.choice(["t-silence", "t-boost", "t-clamp"]),
                                   "positions": rng.choice(["all", "prompt", "generated"])}]}
    neurons = [[rng.randrange(30), rng.randrange(1536)] for _ in range(rng.randrange(50, 600))]
    neurons = [list(n) for n in {tuple(n) for n in neurons}]
    op = rng.choice([{"op": "scale", "factor": round(rng.uniform(-2, 4), 3)},
                     {"op": "clamp", "value": round(rng.uniform(-3, 3), 3)}])
    return {"interventions": [{"neurons": neurons, **op, "positions": rng.choice(["all", "prompt", "generated"])}]}


def test_isolation_in_mixed_concurrent_batches(llm, tokenizer):
    """>= 32 concurrent requests with random specs (some unsteered) == each request alone."""
    rng = random.Random(1234)
    n = 36
    prompts = [_ids(tokenizer, PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))) for i in range(n)]
    specs = [_random_spec(rng) for _ in range(n)]
    assert sum(s is None for s in specs) >= 3 and sum(s is not None for s in specs) >= 20
    together = _run(llm, prompts, specs, max_tokens=12)
    for i in range(n):
        (alone,) = _run(llm, [prompts[i]], [specs[i]], max_tokens=12)
        assert together[i].outputs[0].token_ids == alone.outputs[0].token_ids, (i, specs[i])
    # and the specs really steer: most steered requests differ from their unsteered run
    plain = _run(llm, prompts, [None] * n, max_tokens=12)
    changed = sum(together[i].outputs[0].token_ids != plain[i].outputs[0].token_ids
                  for i in range(n) if specs[i] is not None)
    assert changed >= sum(s is not None for s in specs) // 2


def test_prefix_cache_is_salted_by_spec(llm, tokenizer, default_hf):
    model, _ = default_hf
    text = ("In a quiet laboratory at the edge of the city, a team of researchers spent years studying "
            "how small changes in temperature affect the growth of crystals. ") * 9
    ids = _ids(tokenizer, text + "The most surprising result was")
    assert len(ids) > 2 * 128  # vLLM's CPU KV block is 128 tokens: only full blocks are cached
    first_a = _run(llm, [ids], [SPECS["silence"]])[0]
    again_a = _run(llm, [ids], [SPECS["silence"]])[0]
    plain = _run(llm, [ids], [None])[0]
    spec_b = _run(llm, [ids], [SPECS["explicit-clamp"]])[0]
    plain_again = _run(llm, [ids], [None])[0]
    assert first_a.num_cached_tokens == 0
    assert again_a.num_cached_tokens > 0, "same spec should reuse the cached prefix"
    assert plain.num_cached_tokens == 0 and spec_b.num_cached_tokens == 0, "another spec must not reuse it"
    assert plain_again.num_cached_tokens > 0
    assert again_a.outputs[0].token_ids == first_a.outputs[0].token_ids
    for out, spec in [(first_a, SPECS["silence"]), (plain, None), (spec_b, SPECS["explicit-clamp"])]:
        want, _ = _reference(model, ids, spec, 10)
        assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("spec, message", [
    ({"interventions": [{"set": "no-such-set"}]}, "unknown neuron set 'no-such-set'"),
    ({"interventions": [{"neurons": [[0, 1536]], "op": "scale", "factor": 2}]}, "index 1536 out of range"),
    ({"interventions": [{"neurons": [[30, 0]], "op": "scale", "factor": 2}]}, "layer 30 out of range"),
    ({"interventions": [{"heads": [[0, 9]], "op": "scale", "factor": 0}]}, "heads[0]: head 9 out of range 0..8"),
    ({"interventions": [{"heads": [[0, 1]]}]}, "explicit 'heads' need an 'op'"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": math.inf}]}, "finite"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": math.nan}]}, "finite"),
    ({"interventions": [{"set": "t-boost", "op": "explode"}]}, "op"),
    ("{not json", "not valid JSON"),
    ({"interventions": [{"set": "t-boost"}], "experiment": "x"}, "either 'interventions' or 'experiment'"),
])
def test_bad_specs_raise_before_the_engine(llm, tokenizer, spec, message):
    from vllm.exceptions import VLLMValidationError

    from kn_steer.errors import SpecError

    ids = _ids(tokenizer, PROMPTS[0])
    with pytest.raises(VLLMValidationError) as err:
        _run(llm, [ids], [spec])
    assert isinstance(err.value, SpecError)
    assert message in str(err.value)
    (ok,) = _run(llm, [ids], [None], max_tokens=3)  # the engine is unharmed
    assert len(ok.outputs[0].token_ids) == 3


def test_internal_key_from_client_is_ignored(llm, tokenizer):
    from vllm import SamplingParams

    ids = _ids(tokenizer, PROMPTS[0])
    forged = {"prompt": {"l": [0], "i": [0], "m": [0.0], "a": [99.0]}, "generated": {"l": [], "i": [], "m": [], "a": []}}
    params = SamplingParams(max_tokens=10, temperature=0, extra_args={"kn_steer_compiled": forged})
    forged_out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    (plain,) = _run(llm, [ids], [None])
    assert forged_out.outputs[0].token_ids == plain.outputs[0].token_ids


def test_json_string_spec_through_extra_args(llm, tokenizer):
    """extra_args["kn_steer"] may be a dict, a JSON string or a SteeringSpec."""
    import json

    from kn_steer.steering.spec import SteeringSpec

    ids = _ids(tokenizer, PROMPTS[1])
    (as_dict,) = _run(llm, [ids], [SPECS["silence"]])
    (as_str,) = _run(llm, [ids], [json.dumps(SPECS["silence"])])
    (as_model,) = _run(llm, [ids], [SteeringSpec.model_validate(SPECS["silence"])])
    assert as_dict.outputs[0].token_ids == as_str.outputs[0].token_ids == as_model.outputs[0].token_ids


def test_eager_and_chunked_prefill_match_compiled(llm, tokenizer):
    """enforce_eager + a 32-token budget (long prompts prefilled in chunks) == the compiled engine."""
    kw = dict(ENGINE_KW, max_num_seqs=16)
    eager = make_llm(default_ref()[0].path, enforce_eager=True, max_num_batched_tokens=32, **kw)
    try:
        long_prompt = "Here is a long story about a cat who travelled around the world and met many friends. " * 3
        prompts = [_ids(tokenizer, p) for p in [long_prompt, *PROMPTS[:3]]]
        assert len(prompts[0]) > 32
        specs = [SPECS["silence"], SPECS["compose"], None, SPECS["clamp-generated"]]
        specs_all = specs + [SPECS["boost-prompt"]]
        prompts_all = prompts + [prompts[0]]
        compiled_out = _run(llm, prompts_all, specs_all)
        eager_out = _run(eager, prompts_all, specs_all)
        for a, b in zip(compiled_out, eager_out):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # read-back through chunked prefill: the long prompt's positions arrive over several steps
        from kn_steer.serving.readback import read_back

        read = {"read": {"neurons": [[1, 2], [15, 1500], [29, 808]], "positions": "all"}}
        specs_read = [{**(s or {}), **read} for s in specs]
        got = [read_back(engine, _run(engine, prompts, specs_read)) for engine in (llm, eager)]
        for a, b, ids in zip(*got, prompts):
            assert a.at.tolist() == b.at.tolist() == list(range(len(ids) + 9))
            torch.testing.assert_close(torch.from_numpy(b.values), torch.from_numpy(a.values), rtol=1e-4, atol=1e-5)
    finally:
        shutdown(eager)
