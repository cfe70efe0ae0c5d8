"""Example files: the generic JSONL reader names file, line and field on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kn_steer.errors import DataError
from kn_steer.localize.examples import check_targets, load_examples
from kn_steer.localize.methods.ircan import IRCANExample
from kn_steer.localize.methods.kn import KNExample


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loaders_name_file_line_and_field(tmp_path: Path) -> None:
    good = {"prompts": ["The capital of France is"], "target": " Paris"}
    path = write_jsonl(tmp_path / "kn.jsonl", [good, "", {"prompts": ["x"]}])
    with pytest.raises(DataError, match=r"kn\.jsonl:3: missing field 'target'"):
        load_examples(path, KNExample)
    path = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        load_examples(path, KNExample)
    path = write_jsonl(tmp_path / "ir.jsonl", [{"context": "c: ", "prompt": "q", "targt": " a"}])
    with pytest.raises(DataError, match=r"ir\.jsonl:1: .*missing field 'target'.*unknown field 'targt'"):
        load_examples(path, IRCANExample)
    path = write_jsonl(tmp_path / "dup.jsonl", [{**good, "id": "a"}, {**good, "id": "a"}])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: id 'a' already used on line 1"):
        load_examples(path, KNExample)
    with pytest.raises(DataError, match="cannot read"):
        load_examples(tmp_path / "missing.jsonl", KNExample)
    loaded = load_examples(write_jsonl(tmp_path / "ok.jsonl", [good, good]), KNExample, limit=1)
    assert [e.id for e in loaded] == ["ok.jsonl:1"]


def test_ircan_input_is_context_plus_prompt() -> None:
    original = 'Write a quote that ends in the word "kings": No man can serve two'
    cut = original.rindex(": ") + 2
    ex = IRCANExample(context=original[:cut], prompt=original[cut:], target=" kings")
    assert ex.full_prompt == original


def test_empty_target_is_refused_before_compute() -> None:
    from helpers.tokenizer import word_tokenizer

    with pytest.raises(DataError, match="'e': target '' tokenizes to no token"):
        check_targets([KNExample(id="e", prompts=["the capital of france is"], target="")], word_tokenizer())
