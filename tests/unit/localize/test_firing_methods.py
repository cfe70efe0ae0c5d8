"""``dead`` and ``token`` on a tiny Llama with planted neurons."""

from __future__ import annotations

from helpers.planted import DEAD, PARIS, planted_llama

from kn_steer.localize.methods import Context, get_method
from kn_steer.localize.methods.firing import TextCorpus

TEXTS = TextCorpus(prompts=["the capital of france is paris", "the city of paris is in europe", "the capital of italy is rome",
                            "no man can serve two masters", "penny wise pound foolish"] * 3)


def test_dead_and_token_methods_find_the_planted_neurons():
    model, tok = planted_llama()
    ctx = Context(model, tok)
    dead = get_method("dead")
    params = dead.parse_params({"max_tokens": 16})
    chosen = dead.select(dead.accumulate(ctx, TEXTS, params), params)
    assert DEAD in [(n.layer, n.index) for n in chosen.neurons]
    assert chosen.metrics["tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS.prompts)
    token = get_method("token")
    params = token.parse_params({"token": "paris", "top": 3})
    chosen = token.select(token.accumulate(ctx, TEXTS, params), params)
    first = chosen.neurons[0]
    assert (first.layer, first.index) == PARIS and first.score == 1.0
    assert chosen.metrics["precision"][0] == chosen.metrics["recall"][0] == 1.0 and chosen.metrics["occurrences"] == 6
