"""COSE_KRE (Ying et al. 2023, split as in IRCAN): CommonsenseQA with a misleading context.

Each record: ``question``, ``choices`` (answer texts), ``answer`` (letter of the original gold
answer: what the model has memorised, the trap here), ``candidate`` (letter of the answer the
``negative_context`` argues for: the context-faithful answer) and ``negative_context``. Files
are a JSON array (as published) or JSONL.

Prompt template for a small instruct causal LM (plain text, no chat template; the choices are
listed so the model sees the options, and each is scored as the continuation ``" " + text``
by its total log-probability)::

    Answer the question according to the context.
    Context: {negative_context}
    Question: {question}
    Choices: {choice 1}, {choice 2}, ..., {choice n}
    Answer:

The context-free prompt (IRCAN's path start) is the same template without the first two lines
(``context + question_prompt == prompt``).
"""

from __future__ import annotations

import string
from pathlib import Path

from kn_steer.data.common import ChoiceItem, field, read_json_records
from kn_steer.errors import DataError

INSTRUCTION = "Answer the question according to the context."


def question_block(question: str, choices: list[str]) -> str:
    """The context-free part of the prompt: question, listed choices and the answer cue."""
    return f"Question: {question.strip()}\nChoices: {', '.join(c.strip() for c in choices)}\nAnswer:"


def context_block(context: str) -> str:
    """The part IRCAN calls the context: instruction and the (misleading) passage, with the newline."""
    return f"{INSTRUCTION}\nContext: {context.strip()}\n"


def build_prompt(context: str, question: str, choices: list[str]) -> str:
    return context_block(context) + question_block(question, choices)


def _letter_index(obj: dict, name: str, n: int, path: Path, line: int) -> int:
    letter = field(obj, name, str, path, line).strip().upper()
    letters = string.ascii_uppercase[:n]
    if len(letter) != 1 or letter not in letters:
        raise DataError(f"{path}:{line}: field {name!r} is {obj[name]!r}, not one of the letters {letters}")
    return letters.index(letter)


def load_kre(path: str | Path) -> list[ChoiceItem]:
    """Every item of a COSE_KRE file; a malformed record is a DataError naming line and field."""
    path = Path(path)
    items: list[ChoiceItem] = []
    for line, obj in read_json_records(path):
        question = field(obj, "question", str, path, line)
        choices = field(obj, "choices", list, path, line)
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{path}:{line}: field 'choices' should be a list of at least two non-empty strings")
        context = field(obj, "negative_context", str, path, line)
        if not context.strip():
            raise DataError(f"{path}:{line}: field 'negative_context' is empty")
        faithful = _letter_index(obj, "candidate", len(choices), path, line)
        trap = _letter_index(obj, "answer", len(choices), path, line)
        items.append(ChoiceItem(
            id=f"{path.stem}:{line}", prompt=build_prompt(context, question, choices),
            choices=tuple(" " + c.strip() for c in choices), faithful=faithful,
            trap=trap if trap != faithful else None,
            context=context_block(context), question_prompt=question_block(question, choices),
        ))
    return items
