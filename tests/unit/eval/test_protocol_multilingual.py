"""The multilingual protocol on a small mLAMA-style folder with the real model: facts screened per
language, language-agnostic neurons, transfer of the source language's neurons to the others
against random controls, and the held-out-language rules; summaries checked against the rows."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from helpers.mlama import write_mlama

from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.multilingual import MultilingualConfig, protocol, summarize_held_out


def test_config_refuses_a_source_outside_the_languages() -> None:
    with pytest.raises(ValueError, match="source language 'de' is not among"):
        MultilingualConfig(languages=["en", "fr"], source="de")
    with pytest.raises(ValueError, match="min_languages 3 > 2 languages"):
        MultilingualConfig(languages=["en", "fr"], min_languages=3)


def test_protocol_on_paraphrase_languages(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    folder = write_mlama(tmp_path / "mlama")
    config = MultilingualConfig(languages=["en", "xx", "yy"], relations=["P36", "P37"], facts=4, min_languages=2,
                                scan=12, steps=1, seeds=1, controls=["matched"])
    ml = protocol(model, tok, default_ref, folder, config, ResultCache(tmp_path / "c.jsonl"), checkpoints=tmp_path,
                  progress=False)
    facts, screened = ml.known_facts()
    assert len(facts) == 4 and [f.meta["relation"] for f in facts] == ["P36", "P37", "P36", "P37"]
    assert all(f.queries[0].lang == "en" and len(f.queries) >= 2 for f in facts)
    assert screened["queries"] == {"en": 23, "xx": 23, "yy": 23}  # 12 + 11 facts (not Germany -> German)
    assert screened["refused_templates"] == {}
    result = ml.run()
    agnostic = result["agnostic"]
    assert agnostic["facts"] == 4 and 0 <= agnostic["facts_with_agnostic"] <= 4
    assert sum(agnostic["agnostic_layers"].values()) == sum(r["agnostic"] for r in agnostic["per_fact"])
    rows = result["transfer_rows"]
    assert rows, "no fact had source neurons"
    assert min(r["source"] for r in rows) < 0  # suppressing a fact's own neurons lowers P(answer) where found
    other = result["transfer"]["other_languages"]
    per_fact = [statistics.mean(e["set"] for e in r["languages"].values()) for r in rows]
    assert other["set"]["n"] == len(rows) and other["set"]["mean"] == pytest.approx(statistics.mean(per_fact))
    assert 0 <= other["p_vs_matched"] <= 1
    # every query's answer here is the English word: every other language shares the first token
    assert result["transfer"]["other_languages_different_first_token"]["set"]["n"] == 0
    held = result["held_out_rows"]
    assert len(held) == sum(len(f.queries) - 1 for f in facts)
    assert all(r["lang"] != "en" for r in held)
    assert result["held_out"] == summarize_held_out(held)
    assert ml.run()["held_out_rows"] == held  # attributions and effects are cached
