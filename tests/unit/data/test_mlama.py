"""mLAMA loading: facts aligned over languages by Wikidata ids, templates checked, clozes cut right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.mlama import write_mlama

from kn_steer.data.mlama import MISTRANSLATED, cloze, load_mlama, template_problem
from kn_steer.errors import DataError


def test_facts_align_over_languages_and_bad_templates_are_refused(tmp_path: Path) -> None:
    folder = write_mlama(tmp_path / "m")
    data = load_mlama(folder, ["en", "xx", "yy"], ["P36", "P37", "P27"])
    first = next(f for f in data.facts if f.key == "P36:QP360:OParis")
    assert first.queries["en"].prompt == "The capital of France is" and first.queries["en"].target == " Paris"
    assert first.queries["yy"].prompt == "France's capital city is"
    # 12 capitals and 12 languages, less Germany -> German (the answer is spelled in the prompt)
    assert {f.relation for f in data.facts} == {"P36", "P37"} and len(data.facts) == 23
    assert "P37:QP375:OGerman" not in {f.key for f in data.facts}
    assert all(set(f.queries) == {"en", "xx", "yy"} for f in data.facts)
    assert data.refused_templates["P27"] == {"en": "[Y] is not at the end", "xx": "no template", "yy": "no template"}
    # the order is stable and not the file's
    assert [f.key for f in load_mlama(folder, ["en", "xx", "yy"], ["P36", "P37"]).facts] == \
        [f.key for f in data.facts if f.relation != "P27"]


def test_mistranslated_templates_and_answers_in_the_prompt(tmp_path: Path) -> None:
    assert template_problem("P36", "fr", "Le capital de [X] est [Y].").startswith("mistranslated: 'Le capital de'")
    assert ("P36", "nl") in MISTRANSLATED and template_problem("P36", "de", "Die Hauptstadt von [X] ist [Y].") is None
    assert template_problem("P1", "en", "[X] and [X] are [Y]") == "does not hold [X] and [Y] once each"
    # an apostrophe before [Y] keeps the answer glued to it
    assert cloze("La langue de [X] est l'[Y].", "Hugo", "anglais") == ("La langue de Hugo est l'", "anglais")
    assert cloze("[X] est né à [Y].", "Hugo", "Besançon") == ("Hugo est né à", " Besançon")
    folder = write_mlama(tmp_path / "m", {"en": {"P36": "The capital of [X] is [Y] ."}})
    facts = folder / "facts" / "en.jsonl"
    facts.write_text(json.dumps({"relation": "P36", "sub_uri": "Q1", "sub_label": "Brody Raion", "obj_uri": "Q2",
                                 "obj_label": "Brody"}) + "\n" + facts.read_text())
    data = load_mlama(folder, ["en"], ["P36"])
    assert all(f.sub_uri != "Q1" for f in data.facts)  # its answer is spelled in its prompt


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    folder = write_mlama(tmp_path / "m")
    with pytest.raises(DataError, match="missing mLAMA file .*templates/zz.jsonl"):
        load_mlama(folder, ["en", "zz"], ["P36"])
    (folder / "facts" / "xx.jsonl").write_text(json.dumps({"relation": "P36", "sub_uri": "Q1"}) + "\n")
    with pytest.raises(DataError, match=r"xx.jsonl:1: field 'sub_label' is missing or empty"):
        load_mlama(folder, ["en", "xx"], ["P36"])
    with pytest.raises(DataError, match="no languages"):
        load_mlama(folder, [], ["P36"])
