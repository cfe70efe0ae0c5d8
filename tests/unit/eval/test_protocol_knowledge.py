"""The knowledge-neuron protocol on a small PARAREL-style folder with the real model."""

from __future__ import annotations

from pathlib import Path

from helpers.pararel import write_pararel

from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.knowledge import KnowledgeConfig, KnowledgeProtocol


def test_effects_against_matched_and_uniform_controls(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    folder = write_pararel(tmp_path / "pararel")
    config = KnowledgeConfig(relations=["P36", "P37"], facts=2, paraphrases=1, scan=3, steps=1, seeds=2)
    protocol = KnowledgeProtocol(model, tok, default_ref, folder, config, ResultCache(tmp_path / "c.jsonl"),
                                 checkpoints=tmp_path, progress=False)
    result = protocol.run()
    assert result["localized_facts"] == 2 and sum(result["known_facts"].values()) == 2
    overall = result["overall"]
    assert overall["facts"] == len(result["per_fact"]) >= 1
    for dose in ("suppress", "enhance"):
        for kind in ("matched", "uniform"):
            assert f"{kind}_{dose}" in overall and 0 <= overall[f"p_{dose}_vs_{kind}"] <= 1
    row = result["per_fact"][0]
    assert row["suppress"] < 0  # zeroing the fact's own neurons lowers P(answer)
    assert set(row["layers"]) and sum(row["layers"].values()) == row["neurons"]
    assert protocol.run()["per_fact"] == result["per_fact"]  # cached
