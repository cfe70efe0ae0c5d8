"""The neuron census on a tiny Llama with planted neurons: a dead one, a detector of one token
that removes it, and the per-layer shares."""

from __future__ import annotations

import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.eval.protocols import neuron_census

TEXTS = ["the capital of france is paris", "the official language of spain is spanish",
         "write a quote that ends in paris", "the capital of italy is rome", "no man can serve two masters",
         "penny wise pound foolish", "the city of paris is located in europe", "kenya is located in africa"] * 4


def _planted():
    model, tok = build_tiny_model("llama"), word_tokenizer()
    vocab = tok.get_vocab()
    u = torch.zeros(model.config.hidden_size)
    u[5] = 1.0
    emb = model.get_input_embeddings().weight
    emb.data -= 0.1 * u  # every token reads -u ...
    emb.data[vocab["paris"]] += 0.2 * u  # ... but paris reads +u
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight.data[7] = 0.0  # gate never opens: dead
    mlp.gate_proj.weight.data[11] = 50.0 * u  # opens on paris only
    mlp.up_proj.weight.data[11] = 50.0 * u  # positive there
    head = model.get_output_embeddings().weight
    mlp.down_proj.weight.data[:, 11] = -head.data[vocab["paris"]] / (model.model.norm.weight.data + 1e-6)
    return model, tok, vocab


def test_census_finds_the_planted_dead_neuron_and_detector():
    model, tok, vocab = _planted()
    counts = neuron_census.census_counts(model, tok, TEXTS, max_tokens=16, top_types=20, batch_size=5, progress=False)
    assert counts.tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    paris = counts.type_ids.index(vocab["paris"])
    assert counts.fires[0, 11] == counts.type_counts[paris] == counts.type_fires[paris, 0, 11]
    result = neuron_census.analyse(model, tok, counts, max_rate=0.2, min_fires=4, min_share=0.9)
    assert [0, 7] in result["dead_neurons"] and result["dead_by_layer"][0] >= 1 / 96
    mine = [e for e in result["detector_examples"] if (e["layer"], e["index"]) == (0, 11)]
    assert mine and mine[0]["token"] == "paris" and mine[0]["share"] == 1.0
    assert mine[0]["removal_z"] < -3  # its update pushes 'paris' down, far below the other tokens
    assert result["removal"]["detectors"] == result["detectors"] >= 1
    assert len(result["positional_by_layer"]) == 3 and 0 <= result["removal"]["p_vs_control"] <= 1
