"""``dead`` and ``token`` on a tiny Llama with planted neurons."""

from __future__ import annotations

import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.localize.methods import Context, get_method
from kn_steer.localize.methods.firing import TextCorpus

TEXTS = TextCorpus(prompts=["the capital of france is paris", "the city of paris is in europe", "the capital of italy is rome",
                            "no man can serve two masters", "penny wise pound foolish"] * 3)


def _planted():
    model, tok = build_tiny_model("llama"), word_tokenizer()
    vocab = tok.get_vocab()
    u = torch.zeros(model.config.hidden_size)
    u[5] = 1.0
    emb = model.get_input_embeddings().weight
    emb.data -= 0.1 * u
    emb.data[vocab["paris"]] += 0.2 * u
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight.data[7] = 0.0  # never opens
    mlp.gate_proj.weight.data[11] = 50.0 * u  # opens on paris only
    return model, tok


def test_dead_and_token_methods_find_the_planted_neurons():
    model, tok = _planted()
    ctx = Context(model, tok)
    dead = get_method("dead")
    params = dead.parse_params({"max_tokens": 16})
    chosen = dead.select(dead.accumulate(ctx, TEXTS, params), params)
    assert (0, 7) in [(n.layer, n.index) for n in chosen.neurons]
    assert chosen.metrics["tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS.prompts)
    token = get_method("token")
    params = token.parse_params({"token": "paris", "top": 3})
    chosen = token.select(token.accumulate(ctx, TEXTS, params), params)
    first = chosen.neurons[0]
    assert (first.layer, first.index) == (0, 11) and first.score == 1.0
    assert chosen.metrics["precision"][0] == chosen.metrics["recall"][0] == 1.0 and chosen.metrics["occurrences"] == 6
