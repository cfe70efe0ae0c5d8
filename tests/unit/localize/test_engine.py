"""The fast batched IG engine against the plain per-layer oracle, on real and tiny models."""

from __future__ import annotations

import pytest
import torch

from helpers.oracle import reference_attribution
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize.engine import (
    attribute,
    attribute_ids,
    encode_prompt,
    encode_target,
)
from kn_steer.models.families import ModelShape


def _rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast - ref).abs().max() / ref.abs().max())


def _top(scores: torch.Tensor, k: int = 20) -> set[int]:
    return set(scores.flatten().topk(k).indices.tolist())


def _random_ids(seed: int, n: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CASES = {
    "first": dict(target_mode="first", baseline=False),
    "sum": dict(target_mode="sum", baseline=False),
    "ircan-sum": dict(target_mode="sum", baseline=True),
    "ircan-first": dict(target_mode="first", baseline=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_fast_matches_oracle_on_tiny_families(family: str, case: str) -> None:
    model = build_tiny_model(family)
    prompt, target = _random_ids(1, 9), _random_ids(2, 3)
    opts = CASES[case]
    baseline = prompt[4:] if opts["baseline"] else None
    kwargs = dict(baseline_ids=baseline, steps=5, target_mode=opts["target_mode"])
    ref = reference_attribution(model, prompt, target, **kwargs)
    fast = attribute_ids(model, prompt, target, **kwargs)
    shape = ModelShape.from_config(model.config)
    assert fast.scores.shape == ref.shape == (shape.num_layers, shape.intermediate_size)
    assert ref.abs().max() > 0
    assert _rel_err(fast.scores, ref) < 1e-3
    assert _top(fast.scores) == _top(ref)


def test_twenty_steps_and_step_chunks_match_oracle() -> None:
    model = build_tiny_model("llama", seed=3)
    prompt, target = _random_ids(5, 12), _random_ids(6, 2)
    ref = reference_attribution(model, prompt, target, steps=20)
    whole = attribute_ids(model, prompt, target, steps=20).scores
    chunked = attribute_ids(model, prompt, target, steps=20, step_chunk=7).scores
    assert _rel_err(whole, ref) < 1e-3 and _top(whole) == _top(ref)
    assert _rel_err(chunked, whole) < 1e-5


def test_single_token_prompt_has_no_prefix() -> None:
    model = build_tiny_model("qwen2")
    ref = reference_attribution(model, [7], [9, 4], steps=4, target_mode="sum")
    fast = attribute_ids(model, [7], [9, 4], steps=4, target_mode="sum").scores
    assert _rel_err(fast, ref) < 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_first_order_is_one_step_ig_at_the_activation(family: str) -> None:
    """Gradient x (a - a') at the actual activation == IG with m = 1 (its only point is a)."""
    model = build_tiny_model(family)
    prompt, target = _random_ids(8, 10), _random_ids(9, 2)
    for baseline in (None, prompt[3:]):
        one = attribute_ids(model, prompt, target, baseline_ids=baseline, steps=1, target_mode="sum")
        first = attribute_ids(model, prompt, target, baseline_ids=baseline, first_order=True, target_mode="sum")
        assert _rel_err(first.scores, one.scores) < 1e-4


def test_objective_is_the_model_probability(default_hf) -> None:
    model, tok = default_hf
    prompt, target = encode_prompt(tok, "The capital of France is"), encode_target(tok, " Paris")
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = float(torch.softmax(logits.float(), -1)[target[0]])
    got = attribute_ids(model, prompt, target, first_order=True).objective
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected > 0.3  # the real model knows it


def test_default_model_matches_oracle(default_hf) -> None:
    model, tok = default_hf
    prompt, target = encode_prompt(tok, "The capital of France is"), encode_target(tok, " Paris")
    ref = reference_attribution(model, prompt, target, steps=4)
    fast = attribute(model, tok, "The capital of France is", " Paris", steps=4)
    assert fast.shape == (30, 1536)
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)


def test_default_model_ircan_sum_matches_oracle(default_hf) -> None:
    model, tok = default_hf
    context, question, answer = 'Write a quote that ends in the word "wise": ', "Penny wise, pound", " wise."
    prompt, base = encode_prompt(tok, context + question), encode_prompt(tok, question)
    target = encode_target(tok, answer)
    assert len(target) == 2
    ref = reference_attribution(model, prompt, target, baseline_ids=base, steps=2, target_mode="sum")
    fast = attribute_ids(model, prompt, target, baseline_ids=base, steps=2, target_mode="sum").scores
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)


def test_bad_inputs_are_clear(default_hf) -> None:
    model, tok = default_hf
    with pytest.raises(DataError, match="tokenizes to no token"):
        attribute(model, tok, "The capital of France is", "")
    with pytest.raises(KnSteerError, match="target_mode"):
        attribute_ids(model, [1, 2], [3], target_mode="all")
    with pytest.raises(KnSteerError, match="steps"):
        attribute_ids(model, [1, 2], [3], steps=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_packed_windows_match_oracle(family: str, monkeypatch) -> None:
    """Rows split over several packed layer calls (uneven windows, multi-token tail) stay exact."""
    from kn_steer.localize import engine

    monkeypatch.setattr(engine, "TOKEN_CHUNK", 7)
    model = build_tiny_model(family, seed=2)
    prompt, target = _random_ids(11, 10), _random_ids(12, 3)
    kwargs = dict(baseline_ids=prompt[4:], steps=6, target_mode="sum")
    ref = reference_attribution(model, prompt, target, **kwargs)
    fast = attribute_ids(model, prompt, target, **kwargs).scores
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_matches_oracle(family: str) -> None:
    """The packed rows' attention mask also works for eager attention (an additive float mask)."""
    model = build_tiny_model(family, seed=4)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    prompt, target = _random_ids(13, 8), _random_ids(14, 2)
    ref = reference_attribution(model, prompt, target, steps=4, target_mode="sum")
    fast = attribute_ids(model, prompt, target, steps=4, target_mode="sum").scores
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)
