"""The fast batched IG engine against the plain per-layer oracle, on real and tiny models.

Gemma 3 gets its own tiny model (sliding window 8 on three of four layers) so prompts longer than
the window are cheap; the real Gemma-3-270M checks are marked slow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.oracle import reference_attribution
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize.engine import (
    _TargetProbability,
    attribute,
    attribute_ids,
    encode_prompt,
    encode_target,
    target_probability_autograd,
)
from kn_steer.models.families import ModelShape

TINY_WINDOW = 8


def build_tiny_gemma3(seed: int = 0, softcap: float | None = None, attn: str = "sdpa",
                      window: int = TINY_WINDOW):
    """A tiny random Gemma 3: sliding-window layers (window 8) around one global layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        sliding_window=window, max_position_embeddings=256, final_logit_softcapping=softcap,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.set_attn_implementation(attn)
    return model.eval().requires_grad_(False)


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


# ------------------------------------------------------------------------------------ Gemma 3


@pytest.mark.parametrize("mode", ["first", "sum"])
@pytest.mark.parametrize("length", [5, TINY_WINDOW, TINY_WINDOW + 1, 3 * TINY_WINDOW])
def test_gemma3_sliding_window_matches_oracle(length: int, mode: str) -> None:
    """Prompts shorter than, as long as and longer than the window: the packed tail attends to
    only the last ``window`` positions on sliding layers, as the full forward does."""
    model = build_tiny_gemma3(seed=length)
    prompt, target = _random_ids(20 + length, length), _random_ids(21, 3)
    kwargs = dict(steps=4, target_mode=mode, baseline_ids=prompt[length // 2:] if mode == "sum" else None)
    ref = reference_attribution(model, prompt, target, **kwargs)
    fast = attribute_ids(model, prompt, target, **kwargs).scores
    assert fast.shape == ref.shape == (4, 96) and ref.abs().max() > 0
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_softcap_packed_windows_match_oracle(attn: str, monkeypatch) -> None:
    """A final-logit soft cap, rows split over several layer calls, both attention kernels."""
    from kn_steer.localize import engine

    monkeypatch.setattr(engine, "TOKEN_CHUNK", 7)
    model = build_tiny_gemma3(seed=5, softcap=3.0, attn=attn)
    prompt, target = _random_ids(22, 2 * TINY_WINDOW + 3), _random_ids(23, 3)
    kwargs = dict(steps=6, target_mode="sum")
    ref = reference_attribution(model, prompt, target, **kwargs)
    fast = attribute_ids(model, prompt, target, **kwargs).scores
    assert _rel_err(fast, ref) < 1e-3
    assert _top(fast) == _top(ref)


def test_gemma3_window_matters() -> None:
    """The checks above have teeth: with the same weights, a window wider than the prompt gives
    other scores for a long prompt (and the same for a short one)."""
    narrow, wide = build_tiny_gemma3(seed=6), build_tiny_gemma3(seed=6, window=256)
    target = _random_ids(25, 1)
    for length, differ in ((TINY_WINDOW - 2, False), (3 * TINY_WINDOW, True)):
        prompt = _random_ids(24, length)
        a = attribute_ids(narrow, prompt, target, steps=2).scores
        b = attribute_ids(wide, prompt, target, steps=2).scores
        assert (_rel_err(a, b) > 1e-2) == differ


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_target_probability_is_exact(softcap: float | None, monkeypatch) -> None:
    """The one-pass LM-head objective equals autograd through the full softmax, value and
    gradient, across uneven vocabulary chunks and with a bias."""
    from kn_steer.localize import engine

    monkeypatch.setattr(engine, "HEAD_CHUNK_ELEMENTS", 5 * 37)  # 37 columns for 5 rows: 4 chunks
    torch.manual_seed(0)
    head = nn.Linear(16, 131, bias=True).requires_grad_(False)
    head.weight.mul_(4)  # sharp softmax: large logits exercise the running max
    hidden = torch.randn(5, 16, requires_grad=True)
    target = torch.tensor([0, 36, 37, 130, 75])
    weights = torch.rand(5)
    expected = target_probability_autograd(head, hidden, target, softcap)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), hidden)
    got = _TargetProbability.apply(hidden, head.weight, head.bias, target, softcap)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def gemma_hf():
    from kn_steer.models import load_hf_model, resolve_model

    return load_hf_model(resolve_model("gemma3-270m"))


@pytest.mark.slow
def test_gemma3_real_model_matches_oracle(gemma_hf) -> None:
    model, tok = gemma_hf
    prompt, target = encode_prompt(tok, "The Eiffel Tower is located in the city of"), encode_target(tok, " Paris")
    assert prompt[0] == 2  # <bos>
    ref = reference_attribution(model, prompt, target, steps=2)  # 18 full forwards per step
    fast = attribute_ids(model, prompt, target, steps=2)
    assert fast.scores.shape == (18, 2048)
    assert fast.objective > 0.3  # the base model knows it (with <bos>)
    assert _rel_err(fast.scores, ref) < 1e-3
    assert _top(fast.scores) == _top(ref)


@pytest.mark.slow
def test_gemma3_real_model_prompt_longer_than_the_window(gemma_hf) -> None:
    """770 tokens against the 512-token window, a 3-token target ("sum"). The oracle runs three
    layers only (full forwards of 770 tokens are slow): sliding layers 0 and 16 and the global
    layer 5; every layer's score depends on all later layers, sliding and global."""
    model, tok = gemma_hf
    facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))
    prompt = encode_prompt(tok, facts + " The Eiffel Tower is located in the city of")
    target = encode_target(tok, " Paris, France")
    assert len(prompt) > model.config.sliding_window + 200 and len(target) == 3
    layers = [0, 5, 16]
    assert [model.config.layer_types[j] for j in layers] == ["sliding_attention", "full_attention",
                                                             "sliding_attention"]
    ref = reference_attribution(model, prompt, target, steps=2, target_mode="sum", layers=layers)
    fast = attribute_ids(model, prompt, target, steps=2, target_mode="sum").scores
    assert _rel_err(fast[layers], ref[layers]) < 1e-3
    assert _top(fast[layers]) == _top(ref[layers])
