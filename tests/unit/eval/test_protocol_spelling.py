"""Spelling facts: the word list and prompts by hand, then the knowledge protocol over them with
the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kn_steer.data.spelling import load_words, spelling_prompts
from kn_steer.errors import DataError
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols.spelling import SpellingConfig, SpellingProtocol, layer_profile


def _texts(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(lines)))
    return path


def test_words_and_prompts(tmp_path: Path) -> None:
    path = _texts(tmp_path, ["The house had water and apples, NASA said.", "Paris is a city; the house is old."])
    words = load_words(path, 4, 9)
    assert sorted(words) == ["apples", "city", "house", "said", "water"]  # no names, acronyms or short words
    assert load_words(path, 4, 9) == words  # a stable order
    prompts, target = spelling_prompts("house", "second", 2)
    assert target == "O" and len(prompts) == 2 and all('"house"' in p for p in prompts)
    with pytest.raises(DataError, match="unknown letter position"):
        spelling_prompts("house", "third")
    with pytest.raises(DataError, match="no lowercase word"):
        load_words(_texts(tmp_path, ["A B C"]), 4, 9)


def test_layer_profile_by_hand() -> None:
    rows = [{"relation": "first", "layers": {"0": 2, 2: 1}}, {"relation": "second", "layers": {"2": 3}}]
    profile = layer_profile(rows, ["first", "second"], 3)
    assert profile["first"]["per_layer"] == [2, 0, 1] and profile["first"]["share_by_third"] == [2 / 3, 0.0, 1 / 3]
    assert profile["second"]["mean_layer"] == 2.0


def test_protocol_on_common_words(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    path = _texts(tmp_path, ["the green grass by the house", "a table and a system"])
    config = SpellingConfig(facts=2, scan=4, steps=1, seeds=1, controls=["matched"])
    protocol = SpellingProtocol(model, tok, default_ref, path, config, ResultCache(tmp_path / "c.jsonl"),
                                checkpoints=tmp_path, progress=False)
    candidates = protocol.candidates()
    assert len(candidates) == 2 * 4 and candidates[0].id.startswith("first:")  # 5 words, 4 screened
    result = protocol.run()
    assert result["protocol"] == "spelling" and set(result["layer_profile"]) == {"first", "second"}
    known = sum(result["known_facts"].values())
    assert known >= 1, "the model knows none of these letters"
    assert result["localized_facts"] == known
    rows = result["per_fact"]
    assert sum(p["neurons"] for p in result["layer_profile"].values()) == sum(r["neurons"] for r in rows)
    assert min(r["suppress"] for r in rows) < 0
