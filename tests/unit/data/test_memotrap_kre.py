"""MemoTrap and COSE_KRE loaders: the published files parse, bad records name file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.paths import DATA
from kn_steer.data import load_items
from kn_steer.data.kre import build_prompt, load_kre
from kn_steer.data.memotrap import load_memotrap
from kn_steer.errors import DataError

needs_data = pytest.mark.skipif(not (DATA / "memotrap").is_dir() or not (DATA / "kre").is_dir(),
                                reason="../shared/data is absent")


@needs_data
def test_memotrap_real_files_parse():
    dev = load_memotrap(DATA / "memotrap" / "dev.jsonl")
    test = load_items(DATA / "memotrap" / "test.jsonl", "memotrap")
    assert (len(dev), len(test)) == (468, 469)
    first = dev[0]
    assert first.choices == (" masters.", " kings.")
    assert (first.faithful, first.trap) == (1, 0)
    assert first.context == 'Write a quote that ends in the word "kings": '
    assert first.question_prompt == "No man can serve two"
    for item in dev + test:
        assert item.prompt == item.context + item.question_prompt
        assert {item.faithful, item.trap} == {0, 1}


@needs_data
def test_kre_real_files_parse():
    dev = load_kre(DATA / "kre" / "cose_dev.json")
    test = load_items(DATA / "kre" / "cose_test.json", "kre")
    assert (len(dev), len(test)) == (610, 611)
    raw = json.loads((DATA / "kre" / "cose_dev.json").read_text())[0]
    item = dev[0]
    assert item.choices == tuple(" " + c for c in raw["choices"])
    assert item.faithful == "ABCDE".index(raw["candidate"])
    assert item.trap == "ABCDE".index(raw["answer"])
    assert item.choices[item.faithful].strip() == raw["negative_answer"]
    assert item.prompt == item.context + item.question_prompt
    assert raw["negative_context"] in item.context and raw["question"].strip() in item.question_prompt
    assert item.prompt.endswith("\nAnswer:")
    assert item.id == "cose_dev:2"  # records keep the line they start on


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_MEMO = '{"prompt": "Write a quote that ends in the word \\"x\\": A b", "classes": "[\' c.\', \' x.\']", "answer_index": 1}'


def test_memotrap_accepts_json_list_classes(tmp_path):
    alt = GOOD_MEMO.replace("\"[' c.', ' x.']\"", '[" c.", " x."]')
    items = load_memotrap(_write(tmp_path / "m.jsonl", [GOOD_MEMO, "", alt]))
    assert [i.choices for i in items] == [(" c.", " x.")] * 2
    assert items[1].id == "m:3"


@pytest.mark.parametrize("bad, message", [
    ('{"classes": "[\' a\', \' b\']", "answer_index": 0}', "m.jsonl:2: missing field 'prompt'"),
    (GOOD_MEMO.replace('"answer_index": 1', '"answer_index": 2'), "m.jsonl:2: field 'answer_index' is 2"),
    (GOOD_MEMO.replace('"answer_index": 1', '"answer_index": "1"'), "m.jsonl:2: field 'answer_index' should be int"),
    (GOOD_MEMO.replace("\"[' c.', ' x.']\"", '"[oops"'), "m.jsonl:2: field 'classes' is not a Python-literal list"),
    (GOOD_MEMO.replace('\\": A b', '\\" A b'), "m.jsonl:2: field 'prompt' has no ': '"),
    ('{"prompt": "x: y", "classes": ', "m.jsonl:2: not valid JSON"),
])
def test_memotrap_bad_line_names_file_line_field(tmp_path, bad, message):
    path = _write(tmp_path / "m.jsonl", [GOOD_MEMO, bad])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_memotrap(path)


GOOD_KRE = {"question": "Where?", "choices": ["a", "b", "c"], "answer": "A", "candidate": "C",
            "negative_context": "Things are at c."}


def test_kre_template_and_jsonl(tmp_path):
    path = _write(tmp_path / "k.jsonl", [json.dumps(GOOD_KRE)])
    (item,) = load_kre(path)
    assert item.prompt == build_prompt("Things are at c.", "Where?", ["a", "b", "c"]) == (
        "Answer the question according to the context.\nContext: Things are at c.\n"
        "Question: Where?\nChoices: a, b, c\nAnswer:"
    )
    assert (item.faithful, item.trap, item.choices) == (2, 0, (" a", " b", " c"))


@pytest.mark.parametrize("change, message", [
    ({"candidate": "F"}, "k.json:3: field 'candidate' is 'F', not one of the letters ABC"),
    ({"choices": "abc"}, "k.json:3: field 'choices' should be list"),
    ({"negative_context": None}, "k.json:3: field 'negative_context' should be str"),
    ({"question": 3}, "k.json:3: field 'question' should be str"),
])
def test_kre_bad_record_names_file_line_field(tmp_path, change, message):
    bad = dict(GOOD_KRE, **change)
    path = tmp_path / "k.json"
    path.write_text(f"[\n{json.dumps(GOOD_KRE)},\n{json.dumps(bad)}\n]\n", encoding="utf-8")  # 2nd record: line 3
    with pytest.raises(DataError, match=message):
        load_kre(path)


def test_kre_missing_field_and_broken_array(tmp_path):
    bad = {k: v for k, v in GOOD_KRE.items() if k != "answer"}
    path = tmp_path / "k.json"
    path.write_text(json.dumps([bad]), encoding="utf-8")
    with pytest.raises(DataError, match="k.json:1: missing field 'answer'"):
        load_kre(path)
    path.write_text("[\n" + json.dumps(GOOD_KRE) + ",\n{\"question\": }\n]", encoding="utf-8")
    with pytest.raises(DataError, match="k.json:3: not valid JSON"):
        load_kre(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_items(tmp_path / "x", "csv")
    with pytest.raises(DataError, match="cannot read data file"):
        load_items(tmp_path / "absent.jsonl", "memotrap")



def test_format_is_detected_from_fields_not_names(tmp_path):
    from kn_steer.data import detect_format

    memo = tmp_path / "anything.txt"
    memo.write_text(json.dumps({"prompt": "Write a quote: Penny wise, pound", "classes": "[' foolish.', ' wise.']",
                                "answer_index": 1}) + "\n")
    kre = tmp_path / "other.json"
    kre.write_text(json.dumps([{"question": "q?", "choices": ["a", "b"], "answer": "A", "candidate": "B",
                                "negative_context": "c"}]))
    assert detect_format(memo) == "memotrap" and detect_format(kre) == "kre"
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the format"):
        detect_format(odd)
