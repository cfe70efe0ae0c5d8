"""MemoTrap (Inverse Scaling Prize "memo-trap", classification split as used by IRCAN).

Each line: ``prompt`` (an instruction, ``": "``, then the start of a famous quote), ``classes``
(a Python-literal list of two continuations, as a string in the published files; a JSON list is
accepted too) and ``answer_index`` (the continuation that obeys the instruction). The other
continuation is the memorised ending of the quote: the trap.

For IRCAN the context is the instruction before the last ``": "`` (kept with that separator, so
``context + question_prompt`` is exactly the published prompt) and the context-free prompt is the
quote after it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from kn_steer.data.common import ChoiceItem, field, read_jsonl
from kn_steer.errors import DataError

SEPARATOR = ": "


def _classes(raw: object, path: Path, line: int) -> list[str]:
    value = raw
    if isinstance(raw, str):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise DataError(f"{path}:{line}: field 'classes' is not a Python-literal list ({exc})") from exc
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
        raise DataError(f"{path}:{line}: field 'classes' should be a list of at least two non-empty strings")
    return list(value)


def load_memotrap(path: str | Path) -> list[ChoiceItem]:
    """Every item of a MemoTrap JSONL file; a malformed line is a DataError naming line and field."""
    path = Path(path)
    items: list[ChoiceItem] = []
    for line, obj in read_jsonl(path):
        prompt = field(obj, "prompt", str, path, line)
        classes = _classes(field(obj, "classes", (str, list), path, line), path, line)
        answer = field(obj, "answer_index", int, path, line)
        if not 0 <= answer < len(classes):
            raise DataError(f"{path}:{line}: field 'answer_index' is {answer}, outside 0..{len(classes) - 1}")
        if SEPARATOR not in prompt:
            raise DataError(f"{path}:{line}: field 'prompt' has no {SEPARATOR!r} between instruction and quote")
        cut = prompt.rindex(SEPARATOR) + len(SEPARATOR)
        context, question = prompt[:cut], prompt[cut:]
        if not context[:-len(SEPARATOR)].strip() or not question.strip():
            raise DataError(f"{path}:{line}: field 'prompt' needs text on both sides of the last {SEPARATOR!r}")
        trap = 1 - answer if len(classes) == 2 else None
        items.append(ChoiceItem(
            id=f"{path.stem}:{line}", prompt=prompt, choices=tuple(classes), faithful=answer, trap=trap,
            context=context, question_prompt=question,
        ))
    return items
