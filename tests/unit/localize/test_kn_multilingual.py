"""``kn-multilingual``: the uncertainty-weighted rule and the language-agnostic sets on a table
worked by hand, and one fact attributed per language equals ``kn``'s attribution of each query."""

from __future__ import annotations

import math

import pytest
import torch

from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.methods import Context
from kn_steer.localize.methods.kn import coarse_select
from kn_steer.localize.methods.kn_multilingual import (
    KN_MULTILINGUAL,
    LanguageTable,
    MultilingualExample,
    MultilingualParams,
    language_table,
    query_weights,
    weighted_neurons,
)

TABLE = LanguageTable(neurons=[(0, 1), (2, 5), (3, 7)], threshold=0.2, langs=["en", "de", "de", "it"],
                      confidence=[0.6, 0.2, 0.2, 0.0],
                      normalized=[[1.0, 0.9, 0.0],    # en
                                  [0.8, 0.1, 0.5],    # de, first query
                                  [0.8, 0.3, 0.1],    # de, second query
                                  [0.5, 0.0, 1.0]])   # it (the model gives its answer probability 0)


def test_weights_share_each_languages_confidence() -> None:
    # en 0.6, de 0.2 shared by its two queries, it 0: normalized over 0.8
    assert query_weights(TABLE, range(4), "confidence") == pytest.approx([0.75, 0.125, 0.125, 0.0])
    assert query_weights(TABLE, range(4), "uniform") == pytest.approx([1 / 3, 1 / 6, 1 / 6, 1 / 3])
    assert query_weights(TABLE, [3], "confidence") == [1.0]  # all-zero confidence: equal weights


def test_weighted_rule_by_hand() -> None:
    kept = weighted_neurons(TABLE, range(4), 0.0, "confidence")
    # (0, 1): 0.75 + 0.2 = 0.95; (2, 5): 0.675 + 0.05 = 0.725; (3, 7): 0.075
    assert [(n.layer, n.index) for n in kept] == [(0, 1), (2, 5)]
    assert kept[0].score == pytest.approx(0.95) and kept[1].score == pytest.approx(0.725)
    spread = weighted_neurons(TABLE, range(4), 1.0, "confidence")
    sd = math.sqrt(0.75 * 0.05 ** 2 + 0.25 * 0.15 ** 2)
    assert spread[0].score == pytest.approx(0.95 - sd)
    # with equal weights the Italian query counts: (3, 7) has mean 0.375 - uncertain across languages
    uniform = {(n.layer, n.index): n.score for n in weighted_neurons(TABLE, range(4), 0.0, "uniform")}
    assert uniform[(3, 7)] == pytest.approx((0.5 + 0.1) / 6 + 1 / 3)
    assert weighted_neurons(TABLE, [], 0.0, "uniform") == []


def test_language_coarse_sets_and_agnostic_neurons() -> None:
    assert TABLE.language_coarse("de") == {(0, 1)}  # coarse on both German queries
    assert TABLE.language_coarse("en") == {(0, 1), (2, 5)} and TABLE.language_coarse("it") == {(0, 1), (3, 7)}
    assert TABLE.agnostic() == {(0, 1)} and TABLE.agnostic(["en", "it"]) == {(0, 1)}
    assert TABLE.queries_of(["de"]) == [1, 2]


def test_each_query_is_attributed_as_kn_would(default_hf) -> None:
    model, tok = default_hf
    example = MultilingualExample(id="f", queries=[
        {"lang": "en", "prompt": "The capital of France is", "target": " Paris"},
        {"lang": "xx", "prompt": "France's capital city is", "target": " Paris"}])
    assert example.target == " Paris" and example.languages == ["en", "xx"]
    params = MultilingualParams(steps=2)
    table = language_table(Context(model, tok), example, params)
    for q, query in enumerate(example.queries):
        result = attribute_ids(model, encode_prompt(tok, query.prompt), encode_target(tok, query.target), steps=2)
        assert table.confidence[q] == pytest.approx(result.objective, rel=1e-5)
        coarse = {(n.layer, n.index) for n in coarse_select(result.scores, 0.2)}
        assert table.coarse(q) == coarse
        top = float(result.scores.max())
        j = table.neurons.index(max(coarse, key=lambda n: float(result.scores[n])))
        assert table.normalized[q][j] == pytest.approx(1.0)
        assert torch.isclose(result.scores.max(), torch.tensor(top))
    scored = KN_MULTILINGUAL.score(Context(model, tok), example, params)
    assert scored.info["agnostic"] == len(table.agnostic()) and scored.info["languages"] == ["en", "xx"]
