"""The relation-heads protocol on a small PARAREL-style folder with the real model: heads from the
library method, accuracy with them zeroed against random heads, beside as many relation-neuron
units; rows, summary and cache agree."""

from __future__ import annotations

import statistics
from pathlib import Path

from helpers.pararel import write_pararel

from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.relation_heads import RelationHeadsConfig, protocol, summarize


def test_heads_beside_neurons(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    config = RelationHeadsConfig(facts_per_relation=6, prompts_per_fact=1, test_facts=10, test_prompts=1, min_known=2,
                                 head_counts=[1, 2], max_relations=1, max_prompts=3, seeds=1, controls=["matched"],
                                 head_layers=[28, 29])  # 18 of the 270 heads: the suite's time
    cache = ResultCache(tmp_path / "cache.jsonl")
    rh = protocol(model, tok, default_ref, write_pararel(tmp_path / "pararel"), config, cache, progress=False)
    assert rh.config.counts == [64, 128]  # SmolLM2: 64-wide heads, k heads = 64 k neurons
    result = rh.run()
    (relation,) = result["known_prompts"]
    rows = result["rows"]
    assert [(r["relation"], r["k"], r["units"]) for r in rows] == [(relation, 1, 64), (relation, 2, 128)]
    top = result["head_scores"][relation]["top"]
    info = result["head_scores"][relation]["info"]
    assert info["other_prompts"] == info["prompts"] > 0  # as many right-answered prompts of the other relations
    assert rows[0]["heads"] == top[:1] and rows[1]["heads"] == top[:2] and {h[0] for h in top} <= {28, 29}
    for row in rows:
        for name in ("heads_set", "heads_matched", "neurons_set", "neurons_matched"):
            assert 0 <= row[name]["own"] <= 1 and 0 <= row[name]["others"] <= 1
    # one relation's prompts scored with its heads zeroed, by hand from the cached bits
    known = [p for p, ok in zip(rh.held_out(), rh.correct(rh.held_out(), [])) if ok == "1"
             and p.relation in result["known_prompts"]]
    bits = rh.correct_heads(known, [tuple(h) for h in top[:1]])
    assert rows[0]["heads_set"]["own"] == statistics.mean(b == "1" for b in bits)
    assert result["summary"] == summarize(rows, [1, 2], ["matched"])
    cached = len(cache)
    assert rh.run()["rows"] == rows and len(cache) == cached
