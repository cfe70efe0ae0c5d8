"""A tiny Llama with planted firing patterns (dead and token-detector tests)."""

from __future__ import annotations

import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

DEAD = (0, 7)  # its gate row is zero: the gate never opens
PARIS = (0, 11)  # opens its gate on 'paris' only


def planted_llama():
    """(model, tokenizer): every token's embedding reads -u, 'paris' reads +u; neuron PARIS's gate
    row is 50u, neuron DEAD's is 0."""
    model, tok = build_tiny_model("llama"), word_tokenizer()
    vocab = tok.get_vocab()
    u = torch.zeros(model.config.hidden_size)
    u[5] = 1.0
    emb = model.get_input_embeddings().weight
    emb.data -= 0.1 * u
    emb.data[vocab["paris"]] += 0.2 * u
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.weight.data[DEAD[1]] = 0.0
    mlp.gate_proj.weight.data[PARIS[1]] = 50.0 * u
    return model, tok
