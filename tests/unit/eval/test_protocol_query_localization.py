"""Query localization: the selection rules and Otsu's split by hand, then the protocol on a small
PARAREL-style folder (two paraphrased templates) with the real model."""

from __future__ import annotations

from pathlib import Path

from helpers.pararel import FACTS, write_pararel

from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.query_localization import (
    QueryLocalizationConfig,
    jaccard,
    otsu_threshold,
    protocol,
)
from kn_steer.localize.methods.kn_consistent import QueryTable, consistent_neurons, shared_neurons

TABLE = QueryTable(neurons=[(0, 1), (2, 5), (3, 7)], maxima=[2.0, 4.0, 1.0], threshold=0.2,
                   normalized=[[1.0, 0.3, 0.0],    # query 0
                               [0.9, 1.0, 0.1],    # query 1
                               [0.8, 0.0, 1.0]])   # query 2


def test_rules_on_a_known_table() -> None:
    assert TABLE.coarse(0) == {(0, 1), (2, 5)} and TABLE.coarse(2) == {(0, 1), (3, 7)}
    # Dai et al.: coarse in more than half of the queries
    assert [(n.layer, n.index) for n in shared_neurons(TABLE, range(3), 0.5)] == [(0, 1), (2, 5)]
    # consistency-aware: (2, 5) has mean 0.43 but sd 0.41, so only (0, 1) passes with spread 1
    kept = consistent_neurons(TABLE, range(3), 1.0)
    assert [(n.layer, n.index) for n in kept] == [(0, 1)] and abs(kept[0].score - (0.9 - 0.0816497)) < 1e-6
    assert [(n.layer, n.index) for n in consistent_neurons(TABLE, range(3), 0.0)] == [(0, 1), (2, 5), (3, 7)]
    # restricted to the first two queries, (3, 7) is coarse on neither and cannot pass
    assert (3, 7) not in {(n.layer, n.index) for n in consistent_neurons(TABLE, [0, 1], 0.0)}


def test_otsu_and_jaccard() -> None:
    assert 0.12 < otsu_threshold([0.1, 0.12, 0.11, 0.8, 0.82]) < 0.8
    assert otsu_threshold([0.5, 0.5]) == 0.5
    assert jaccard({(0, 1)}, {(0, 1), (1, 2)}) == 0.5 and jaccard(set(), set()) is None


def test_protocol_on_paraphrased_facts(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    capital = (["The capital of [X] is [Y].", "The capital city of [X] is [Y]."], FACTS["P36"][1])
    folder = write_pararel(tmp_path / "pararel", {"P36": capital})
    config = QueryLocalizationConfig(relations=["P36"], facts=3, loc_queries=1, held_out=1, scan=6, steps=1,
                                     seeds=1, controls=["matched"], spread=0.0)
    assert config.paraphrases == 2
    ql = protocol(model, tok, default_ref, folder, config, ResultCache(tmp_path / "c.jsonl"),
                  checkpoints=tmp_path, progress=False)
    result = ql.run()
    c = result["consistency"]
    assert len(c["per_fact"]) == 3 and all(s is None or 0 <= s <= 1 for s in c["per_fact"])
    assert c["consistent_facts"] + c["inconsistent_facts"] == sum(s is not None for s in c["per_fact"])
    # three facts cycling over two templates: both same-template and other-template pairs exist
    assert c["jaccard"]["other_fact_same_template"]["n"] > 0 and c["jaccard"]["other_fact_other_template"]["n"] > 0
    rows = result["per_fact"]
    assert len(rows) == 3 and all(r["prompts"][0] != r["prompts"][1] for r in rows)
    measured = [r for r in rows if "plain_held_out" in r]
    assert measured, "Dai et al.'s rule found no neuron on any fact"
    assert all("plain_held_out_matched" in r and "plain_localized" in r for r in measured)
    assert min(r["plain_localized"] for r in measured) < 0  # suppression lowers P(answer) where localized
    summary = result["modification"]["all"]["plain"]
    assert summary["facts_with_neurons"] == len(measured) and 0 <= summary["held_out"]["p_vs_matched"] <= 1
    assert ql.run()["per_fact"] == rows  # attributions and effects are cached
