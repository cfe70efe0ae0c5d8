"""PARAREL loader: paraphrased cloze patterns and T-REx facts turned into causal-LM prompts.

The folder holds ``patterns/PXXX.jsonl`` (field ``pattern`` with ``[X]``/``[Y]`` slots) and
``facts/PXXX.jsonl`` (fields ``sub_label``, ``obj_label``), one file pair per Wikidata relation,
as in yanaiela/pararel (``data/pattern_data/graphs_json`` and ``data/trex_lms_vocab``).

A fact prompt is the pattern cut before ``[Y]`` with ``[X]`` filled in and trailing spaces
stripped; the target is the object with a leading space (``" Paris"``), so prompt + target is the
sentence a causal LM would write. Patterns where ``[Y]`` is not at the end (only spaces and
punctuation may follow it) cannot be scored as a next-token prediction and are **skipped**; they
are listed in :attr:`Relation.skipped_patterns`.

Facts are split into ``train`` and ``test`` by a hash of the fact (:func:`fact_split`), the same
split everywhere: relation neurons are found on train prompts and evaluated on test prompts.
:func:`relation_prompts` lays out a labelled prompt corpus over several relations.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from kn_steer.errors import DataError
from kn_steer.fileio import read_jsonl

_TAIL_OK = re.compile(r"^[\s.!?,;:]*$")  # what may follow [Y] in a usable pattern


@dataclass(frozen=True)
class Fact:
    """One subject/object pair of a relation, with where it came from."""

    relation: str
    subject: str
    object: str
    uuid: str | None
    source: str  # "file:line"


@dataclass(frozen=True)
class FactPrompts:
    """A fact as paraphrased prompts sharing one target (a knowledge-neuron example)."""

    relation: str
    subject: str
    target: str  # object with a leading space
    prompts: tuple[str, ...]
    uuid: str | None = None

    @property
    def key(self) -> str:
        return f"{self.relation}:{self.uuid or self.subject}"


@dataclass
class Relation:
    """A relation's usable patterns (prompt prefixes), skipped patterns and facts."""

    id: str
    templates: list[str]  # usable patterns, as written
    skipped_patterns: list[str]
    facts: list[Fact] = field(default_factory=list)

    @property
    def prefixes(self) -> list[str]:
        return [p for p in (pattern_prefix(t) for t in self.templates) if p is not None]

    def prompts_for(self, fact: Fact) -> FactPrompts:
        prompts = tuple(fill(prefix, fact.subject) for prefix in self.prefixes)
        return FactPrompts(self.id, fact.subject, " " + fact.object, prompts, fact.uuid)

    def examples(self) -> list[FactPrompts]:
        return [self.prompts_for(f) for f in self.facts]


def pattern_prefix(template: str) -> str | None:
    """The pattern cut before ``[Y]`` (still holding ``[X]``), or None if ``[Y]`` is not at the end."""
    head, sep, tail = template.partition("[Y]")
    if not sep or not _TAIL_OK.match(tail):
        return None
    head = head.rstrip()
    return head if head and "[X]" in head else None


def fill(prefix: str, subject: str) -> str:
    return prefix.replace("[X]", subject)


def _read_jsonl(path: Path, fields: Sequence[str]) -> Iterable[tuple[int, dict]]:
    """Yield (line number, record) with every field present and a non-empty string."""
    for number, record in read_jsonl(path):
        for name in fields:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if name not in record else "not a non-empty string"
                raise DataError(f"{path}:{number}: field {name!r} is {what}")
        yield number, record


def load_relation(folder: str | os.PathLike, relation: str) -> Relation:
    """Patterns and facts of one relation; errors name the file, line and field."""
    folder = Path(folder)
    pattern_file = folder / "patterns" / f"{relation}.jsonl"
    fact_file = folder / "facts" / f"{relation}.jsonl"
    templates: list[str] = []
    skipped: list[str] = []
    for number, record in _read_jsonl(pattern_file, ("pattern",)):
        template = record["pattern"]
        if template.count("[X]") != 1 or template.count("[Y]") != 1:
            raise DataError(
                f"{pattern_file}:{number}: field 'pattern' must hold [X] and [Y] once each: {template!r}"
            )
        (templates if pattern_prefix(template) is not None else skipped).append(template)
    facts = [
        Fact(relation, r["sub_label"].strip(), r["obj_label"].strip(), r.get("uuid"), f"{fact_file}:{n}")
        for n, r in _read_jsonl(fact_file, ("sub_label", "obj_label"))
    ]
    return Relation(relation, templates, skipped, facts)


def relation_ids(folder: str | os.PathLike) -> list[str]:
    """Relations that have both a patterns and a facts file, sorted by number."""
    folder = Path(folder)
    if not (folder / "patterns").is_dir() or not (folder / "facts").is_dir():
        raise DataError(f"{folder} is not a PARAREL folder (needs patterns/ and facts/)")
    ids = {p.stem for p in (folder / "patterns").glob("P*.jsonl")} & {
        p.stem for p in (folder / "facts").glob("P*.jsonl")
    }
    return sorted(ids, key=lambda r: int(r[1:]) if r[1:].isdigit() else 10**9)


def load_pararel(folder: str | os.PathLike, relations: Sequence[str] | None = None) -> dict[str, Relation]:
    """Relations by id (all in the folder by default); a missing relation is a DataError."""
    available = relation_ids(folder)
    wanted = list(relations) if relations is not None else available
    missing = [r for r in wanted if r not in available]
    if missing:
        raise DataError(f"{folder}: no PARAREL relation {', '.join(missing)} (have {', '.join(available)})")
    return {r: load_relation(folder, r) for r in wanted}



# ---------------------------------------------------------------------------- labelled corpus

#: Defaults of the corpus the relation method localizes on (train split).
FACTS_PER_RELATION = 20
PROMPTS_PER_FACT = 3

Split = Literal["train", "test", "all"]


def fact_split(relation: str, fact_id: str) -> str:
    """``train`` or ``test``: a stable hash split (half and half), the same in every script."""
    digest = hashlib.sha256(f"{relation}:{fact_id}".encode("utf-8")).digest()
    return "train" if digest[0] % 2 == 0 else "test"


def _fact_order(relation: str, fact_id: str) -> bytes:
    return hashlib.sha256(f"order:{relation}:{fact_id}".encode("utf-8")).digest()


@dataclass(frozen=True)
class LabelledPrompt:
    """A fact prompt labelled with its relation (and its fact, so a fact's prompts can be grouped)."""

    relation: str
    prompt: str
    target: str
    fact: str


def relation_prompts(
    relations: Mapping[str, Relation],
    split: Split = "train",
    facts_per_relation: int | None = FACTS_PER_RELATION,
    prompts_per_fact: int | None = PROMPTS_PER_FACT,
) -> list[LabelledPrompt]:
    """Prompts of each relation's facts in ``split``, in a stable hashed order.

    Fact ``k`` of a relation uses ``prompts_per_fact`` of its usable patterns starting at pattern
    ``k mod P``, so every pattern is represented even when a fact gets fewer prompts than there
    are patterns. None: every fact / every pattern.
    """
    out: list[LabelledPrompt] = []
    for rid, rel in relations.items():
        prefixes = rel.prefixes
        if not prefixes:
            continue
        facts = [f for f in rel.facts if split == "all" or fact_split(rid, f.uuid or f.subject) == split]
        facts.sort(key=lambda f: _fact_order(rid, f.uuid or f.subject))
        if facts_per_relation is not None:
            facts = facts[:facts_per_relation]
        per_fact = len(prefixes) if prompts_per_fact is None else min(prompts_per_fact, len(prefixes))
        for k, fact in enumerate(facts):
            example = rel.prompts_for(fact)
            for j in range(per_fact):
                out.append(LabelledPrompt(rid, example.prompts[(k + j) % len(prefixes)], example.target, example.key))
    return out
