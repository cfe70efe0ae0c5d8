"""mLAMA (Kassner et al. 2021): one fact as cloze queries in several languages.

The folder holds ``facts/LANG.jsonl`` (``relation, lineid, sub_uri, sub_label, obj_uri, obj_label``)
and ``templates/LANG.jsonl`` (``relation, template`` with ``[X]``/``[Y]``). A fact is the same in
every language when its relation and Wikidata ids (``sub_uri``, ``obj_uri``) agree; its query in a
language is that language's template cut before ``[Y]`` with the subject's label in that language,
and its target is the object's label in that language.

The templates are machine-translated and some are wrong. Each (relation, language) template is
checked before use: it must hold ``[X]`` and ``[Y]`` once with ``[Y]`` at the end (a causal LM
answers next), and it must not be one of :data:`MISTRANSLATED` (read by hand, reasons recorded).
Queries whose answer is spelled inside the prompt (``Brody Raion`` -> ``Brody``) are dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kn_steer.data.pararel import fill, pattern_prefix
from kn_steer.errors import DataError
from kn_steer.fileio import read_jsonl

#: Templates read by hand and found to ask something else (the data README names the first five).
MISTRANSLATED: dict[tuple[str, str], str] = {
    ("P36", "fr"): "'Le capital de' is financial capital (la capitale)",
    ("P36", "nl"): "'Het kapitaal van' is financial capital (de hoofdstad)",
    ("P36", "vi"): "'Vốn của' is financial capital (thủ đô)",
    ("P36", "ja"): "translated as 'capital letter'",
    ("P36", "zh"): "translated as 'capital letter'",
    ("P740", "vi"): "'vào' introduces a date, not a place",
}

#: Latin-script languages whose templates mostly end in [Y] (the default of the multilingual protocol)
DEFAULT_LANGUAGES = ["en", "fr", "es", "de", "it", "pt", "nl"]


@dataclass(frozen=True)
class Query:
    """A fact asked in one language: ``prompt`` is answered by ``target`` (with its leading space)."""

    lang: str
    prompt: str
    target: str


@dataclass
class AlignedFact:
    """One fact (relation, subject and object ids) with its query in every language that has one."""

    relation: str
    sub_uri: str
    obj_uri: str
    queries: dict[str, Query] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.sub_uri}:{self.obj_uri}"


@dataclass
class MlamaFacts:
    """The aligned facts, and why each refused template was refused (``{relation: {lang: why}}``)."""

    facts: list[AlignedFact]
    refused_templates: dict[str, dict[str, str]]


def template_problem(relation: str, lang: str, template: str) -> str | None:
    """Why a template cannot be used as a next-token cloze, or None when it can."""
    if (relation, lang) in MISTRANSLATED:
        return f"mistranslated: {MISTRANSLATED[(relation, lang)]}"
    if template.count("[X]") != 1 or template.count("[Y]") != 1:
        return "does not hold [X] and [Y] once each"
    if pattern_prefix(template) is None:
        return "[Y] is not at the end"
    return None


def _records(path: Path, fields: Sequence[str]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"missing mLAMA file {path}")
    out = []
    for number, record in read_jsonl(path):
        for name in fields:
            if not isinstance(record.get(name), (str, int)) or record.get(name) == "":
                raise DataError(f"{path}:{number}: field {name!r} is missing or empty")
        out.append((number, record))
    return out


def read_templates(folder: Path, lang: str, relations: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The usable templates of ``lang`` for ``relations`` and why the others were refused."""
    usable, refused = {}, {}
    for _, record in _records(folder / "templates" / f"{lang}.jsonl", ("relation", "template")):
        relation, template = record["relation"], record["template"]
        if relation not in relations:
            continue
        problem = template_problem(relation, lang, template)
        if problem is None:
            usable[relation] = template
        else:
            refused[relation] = problem
    for relation in relations:
        if relation not in usable and relation not in refused:
            refused[relation] = "no template"
    return usable, refused


def cloze(template: str, subject: str, answer: str) -> tuple[str, str]:
    """(prompt, target): the template cut before ``[Y]`` with ``subject`` filled in; the target
    keeps the template's space before ``[Y]`` (none after an apostrophe: ``d'[Y]``)."""
    prefix = pattern_prefix(template)
    if prefix is None:
        raise DataError(f"template {template!r}: [Y] is not at the end")
    before = template[: template.index("[Y]")]
    glue = " " if before[-1:].isspace() else ""
    return fill(prefix, subject), glue + answer


def load_mlama(folder: str | Path, languages: Sequence[str], relations: Sequence[str]) -> MlamaFacts:
    """Facts of ``relations`` aligned over ``languages`` (each keeps the languages where its
    template is usable and its answer is not in its prompt), in a stable hashed order."""
    folder = Path(folder)
    if not languages:
        raise DataError("no languages asked")
    facts: dict[tuple[str, str, str], AlignedFact] = {}
    refused: dict[str, dict[str, str]] = {}
    for lang in languages:
        templates, bad = read_templates(folder, lang, relations)
        for relation, why in bad.items():
            refused.setdefault(relation, {})[lang] = why
        fields = ("relation", "sub_uri", "sub_label", "obj_uri", "obj_label")
        for _, record in _records(folder / "facts" / f"{lang}.jsonl", fields):
            template = templates.get(record["relation"])
            if template is None:
                continue
            prompt, target = cloze(template, record["sub_label"], record["obj_label"])
            if record["obj_label"].casefold() in prompt.casefold():
                continue
            key = (record["relation"], record["sub_uri"], record["obj_uri"])
            fact = facts.setdefault(key, AlignedFact(*key))
            fact.queries.setdefault(lang, Query(lang, prompt, target))
    ordered = sorted(facts.values(), key=lambda f: hashlib.sha256(f"mlama:{f.key}".encode()).digest())
    return MlamaFacts(facts=ordered, refused_templates=refused)


__all__ = ["AlignedFact", "DEFAULT_LANGUAGES", "MISTRANSLATED", "MlamaFacts", "Query", "cloze", "load_mlama",
           "read_templates", "template_problem"]
