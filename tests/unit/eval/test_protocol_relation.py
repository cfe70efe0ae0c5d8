"""The relation protocol on a small PARAREL-style folder with the real model."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.pararel import FACTS, write_pararel

from kn_steer.cli.localize import parse_localize_command
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.relation import RelationConfig, RelationProtocol
from kn_steer.localize.methods import RELATION
from kn_steer.sets.format import NeuronSet


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_pararel(tmp_path / "pararel")


def test_matrix_controls_and_a_library_set(default_hf, default_ref, folder: Path, tmp_path: Path) -> None:
    model, tok = default_hf
    config = RelationConfig(facts_per_relation=6, prompts_per_fact=1, test_facts=10, test_prompts=1, min_known=1,
                            counts=[5, 20], matched_counts=[5], seeds=2,
                            matched_extra={"P36": [20]})
    cache = ResultCache(tmp_path / "cache.jsonl")
    protocol = RelationProtocol(model, tok, default_ref, folder, config, cache, progress=False)
    result = protocol.run()
    evaluated = result["evaluated"]
    assert evaluated and set(evaluated) <= set(FACTS)
    for n in ("5", "20"):
        matrix = result["matrices"][n]
        assert set(matrix["rows"]) == set(evaluated) and set(matrix["uniform"]["accuracy"]) == set(evaluated)
        for r, row in matrix["rows"].items():
            assert set(row["accuracy"]) == set(evaluated)
            assert len(row["correct"]) == len(result["known_prompt_list"])
            assert sum(row["layers"].values()) == int(n)
    row = result["matrices"]["5"]["rows"][evaluated[0]]
    assert len(row["matched"]["p_set_vs_control_on_relation"]) == 2
    for r, big in result["matrices"]["20"]["rows"].items():
        assert ("matched" in big) == (r == "P36")
    cached = len(cache)
    assert protocol.run()["matrices"] == result["matrices"] and len(cache) == cached  # all read back

    rel = evaluated[0]
    out = tmp_path / "set.json"
    protocol.build_set(rel, 5, out, name="rel", description="d", metrics={"m": 1})
    ns = NeuronSet.load(out)
    top = protocol.top_neurons(sorted(FACTS))[rel][:5]
    assert [(n.layer, n.index) for n in ns.neurons] == [(l, i) for l, i, _ in top]
    method, values = parse_localize_command(ns.provenance.command)
    assert method is RELATION
    assert RELATION.parse_params({k: v for k, v in values.items() if k in RELATION.params_model.model_fields}) \
        == RELATION.params_model.model_validate(ns.method.params)
