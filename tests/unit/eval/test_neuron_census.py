"""The neuron census on a tiny Llama with planted neurons: a dead one, a detector of one token
that removes it, and the per-layer shares."""

from __future__ import annotations

from helpers.planted import DEAD, PARIS, planted_llama

from kn_steer.eval.protocols import neuron_census

TEXTS = ["the capital of france is paris", "the official language of spain is spanish",
         "write a quote that ends in paris", "the capital of italy is rome", "no man can serve two masters",
         "penny wise pound foolish", "the city of paris is located in europe", "kenya is located in africa"] * 4


def _planted():
    """The planted Llama, and neuron PARIS's gate, up and down rows set so that it writes -'paris'."""
    model, tok = planted_llama()
    vocab = tok.get_vocab()
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight.data[PARIS[1]] = mlp.gate_proj.weight.data[PARIS[1]]  # positive where it fires
    head = model.get_output_embeddings().weight
    mlp.down_proj.weight.data[:, PARIS[1]] = -head.data[vocab["paris"]] / (model.model.norm.weight.data + 1e-6)
    return model, tok, vocab


def test_census_finds_the_planted_dead_neuron_and_detector():
    model, tok, vocab = _planted()
    counts = neuron_census.census_counts(model, tok, TEXTS, max_tokens=16, top_types=20, batch_size=5, progress=False)
    assert counts.tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    paris = counts.type_ids.index(vocab["paris"])
    assert counts.fires[PARIS] == counts.type_counts[paris] == counts.type_fires[(paris, *PARIS)]
    result = neuron_census.analyse(model, tok, counts, max_rate=0.2, min_fires=4, min_share=0.9)
    assert list(DEAD) in result["dead_neurons"] and result["dead_by_layer"][0] >= 1 / 96
    mine = [e for e in result["detector_examples"] if (e["layer"], e["index"]) == PARIS]
    assert mine and mine[0]["token"] == "paris" and mine[0]["share"] == 1.0
    assert mine[0]["removal_z"] < -3  # its update pushes 'paris' down, far below the other tokens
    assert result["removal"]["detectors"] == result["detectors"] >= 1
    assert len(result["positional_by_layer"]) == 3 and 0 <= result["removal"]["p_vs_control"] <= 1
