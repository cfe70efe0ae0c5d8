"""The activation recorder: batched, left-padded recording equals one prompt at a time and the
model's own forward, on every tiny family and the real model."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.localize.recorder import last_token_activations, left_padded
from kn_steer.models.sites import hook_site, remove_hooks

PROMPTS = ["the capital of france is", "kenya is located in the continent of africa", "is"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_batched_equals_single_on_every_family(family: str) -> None:
    model, tok = build_tiny_model(family), word_tokenizer()
    batched = last_token_activations(model, tok, PROMPTS, batch_size=3)
    for row, prompt in enumerate(PROMPTS):
        single = last_token_activations(model, tok, [prompt], batch_size=1)
        torch.testing.assert_close(batched[row], single[0], rtol=1e-4, atol=1e-5)
    # and a plain unpadded forward records the same last-token vector
    seen = {}
    handles = hook_site(model, lambda layer, rows: seen.__setitem__(layer, rows[-1].clone()))
    try:
        with torch.no_grad():
            model(torch.tensor([tok(PROMPTS[1])["input_ids"]]))
    finally:
        remove_hooks(handles)
    flat = torch.cat([seen[l] for l in sorted(seen)])
    torch.testing.assert_close(batched[1], flat, rtol=1e-4, atol=1e-5)


def test_left_padding_layout() -> None:
    tok = word_tokenizer(bos=True)
    batch = left_padded(tok, ["the capital of france is", "is"])
    assert batch.input_ids.shape == (2, 6)
    assert batch.attention_mask[1].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.position_ids[1].tolist()[-2:] == [0, 1] and batch.input_ids[1, -2] == tok.bos_token_id


def test_real_model_batched_equals_single(default_hf) -> None:
    model, tok = default_hf
    prompts = ["The capital of France is", "The official language of Brazil is", "Paris"]
    batched = last_token_activations(model, tok, prompts, batch_size=3)
    for row, prompt in enumerate(prompts):
        single = last_token_activations(model, tok, [prompt], batch_size=1)
        torch.testing.assert_close(batched[row], single[0], rtol=1e-4, atol=1e-4)
