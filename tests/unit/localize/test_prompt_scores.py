"""Next-token prompt scoring, plain and under a deactivation, on tiny families and the real model."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.eval.controls import deactivation
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.models.families import ModelShape
from kn_steer.tokens import continuation_ids, prompt_ids

PROMPTS = ["the capital of france is", "kenya is located in the continent of", "is"]
TARGETS = [" paris", " africa", " rome"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_batched_scores_equal_plain_forwards(family: str) -> None:
    model, tok = build_tiny_model(family), word_tokenizer()
    scores = score_prompts(model, tok, PROMPTS, TARGETS, batch_size=3)
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids(tok, prompt)])).logits[0, -1].float()
        want = continuation_ids(tok, target)[0]
        assert float(scores.prob[i]) == pytest.approx(float(torch.softmax(logits, -1)[want]), abs=1e-5)
        assert int(scores.argmax[i]) == int(logits.argmax())
        assert int(scores.rank[i]) == int((logits > logits[want]).sum())
    shape = ModelShape.from_config(model.config)
    every = [(l, i) for l in range(shape.num_layers) for i in range(shape.intermediate_size)]
    off = score_prompts(model, tok, PROMPTS, TARGETS, deactivation(every, shape))
    assert not torch.allclose(off.prob, scores.prob)


def test_deactivation_changes_predictions(default_hf) -> None:
    model, tok = default_hf
    shape = ModelShape.from_config(model.config)
    base = score_prompts(model, tok, ["The capital of France is"], [" Paris"])
    assert bool(base.correct[0])
    every = [(l, i) for l in range(shape.num_layers) for i in range(0, shape.intermediate_size, 2)]
    off = score_prompts(model, tok, ["The capital of France is"], [" Paris"], deactivation(every, shape))
    assert float(off.prob[0]) < float(base.prob[0])


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        score_prompts(build_tiny_model("llama"), word_tokenizer(), ["a"], [])
