"""PARAREL loader: real files parse into prompts; bad lines name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.paths import PARAREL
from kn_steer.data.pararel import (
    load_pararel,
    load_relation,
    pattern_prefix,
    relation_ids,
)
from kn_steer.errors import DataError

needs_data = pytest.mark.skipif(not PARAREL.is_dir(), reason=f"{PARAREL} is absent")


def test_pattern_prefix_keeps_only_final_y() -> None:
    assert pattern_prefix("The capital of [X] is [Y] .") == "The capital of [X] is"
    assert pattern_prefix("The capital city of [X] is [Y].") == "The capital city of [X] is"
    assert pattern_prefix("[Y] is the capital of [X].") is None
    assert pattern_prefix("[X] is a [Y] by profession.") is None


@needs_data
def test_real_relation_parses() -> None:
    assert "P36" in relation_ids(PARAREL)
    rel = load_relation(PARAREL, "P36")
    assert rel.facts and rel.templates and rel.skipped_patterns
    assert all("[Y]" not in p for p in rel.prefixes)
    ex = rel.prompts_for(rel.facts[0])
    assert ex.target == " " + rel.facts[0].object
    assert len(ex.prompts) == len(rel.prefixes)
    assert all(rel.facts[0].subject in p and not p.endswith(" ") for p in ex.prompts)
    assert "The capital of Cook County is" in ex.prompts


@needs_data
def test_load_subset_and_unknown_relation() -> None:
    rels = load_pararel(PARAREL, ["P36", "P103"])
    assert set(rels) == {"P36", "P103"}
    with pytest.raises(DataError, match="P99999"):
        load_pararel(PARAREL, ["P99999"])


def _write(folder: Path, rel: str, patterns: list[str], facts: list[str]) -> None:
    (folder / "patterns").mkdir(parents=True, exist_ok=True)
    (folder / "facts").mkdir(parents=True, exist_ok=True)
    (folder / "patterns" / f"{rel}.jsonl").write_text("\n".join(patterns) + "\n")
    (folder / "facts" / f"{rel}.jsonl").write_text("\n".join(facts) + "\n")


def test_bad_lines_name_file_line_field(tmp_path: Path) -> None:
    good_pattern = json.dumps({"pattern": "The capital of [X] is [Y]."})
    good_fact = json.dumps({"sub_label": "France", "obj_label": "Paris"})
    _write(tmp_path, "P1", [good_pattern], [good_fact, json.dumps({"sub_label": "Peru"})])
    with pytest.raises(DataError, match=r"facts/P1\.jsonl:2: field 'obj_label' is missing"):
        load_relation(tmp_path, "P1")
    _write(tmp_path, "P2", [good_pattern, "{not json"], [good_fact])
    with pytest.raises(DataError, match=r"patterns/P2\.jsonl:2: not valid JSON"):
        load_relation(tmp_path, "P2")
    _write(tmp_path, "P3", [json.dumps({"pattern": "no slots here"})], [good_fact])
    with pytest.raises(DataError, match=r"patterns/P3\.jsonl:1: field 'pattern'"):
        load_relation(tmp_path, "P3")
    _write(tmp_path, "P4", [good_pattern], [json.dumps({"sub_label": 3, "obj_label": "x"})])
    with pytest.raises(DataError, match=r"P4\.jsonl:1: field 'sub_label' is not a non-empty string"):
        load_relation(tmp_path, "P4")
    _write(tmp_path, "P5", [good_pattern], [good_fact])
    ex = load_relation(tmp_path, "P5").examples()[0]
    assert ex.prompts == ("The capital of France is",) and ex.target == " Paris"


def test_fact_split_and_labelled_corpus(tmp_path: Path) -> None:
    from kn_steer.data.pararel import fact_split, relation_prompts

    (tmp_path / "patterns").mkdir()
    (tmp_path / "facts").mkdir()
    patterns = ["The capital of [X] is [Y].", "[X]'s capital is [Y].", "[Y] is the capital of [X]."]
    (tmp_path / "patterns" / "P36.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in patterns))
    facts = [(f"Country{i}", f"City{i}") for i in range(40)]
    (tmp_path / "facts" / "P36.jsonl").write_text(
        "".join(json.dumps({"sub_label": s, "obj_label": o, "uuid": f"u{i}"}) + "\n" for i, (s, o) in enumerate(facts)))
    relations = load_pararel(tmp_path)
    train = relation_prompts(relations, "train", facts_per_relation=5, prompts_per_fact=2)
    test = relation_prompts(relations, "test", facts_per_relation=None, prompts_per_fact=1)
    assert len(train) == 10 and {p.relation for p in train} == {"P36"}
    assert not {p.fact for p in train} & {p.fact for p in test}  # the split never mixes a fact
    assert all(fact_split("P36", p.fact.split(":", 1)[1]) == "test" for p in test)
    assert {p.prompt.split(" ")[0] for p in train} >= {"The"}  # the usable patterns rotate over facts
    assert len({p.prompt for p in train}) == 10 and all(p.target.startswith(" City") for p in train)
    assert relation_prompts(relations, "train", 5, 2) == train  # stable order
