"""What every evaluation loader returns, and line-numbered reading of JSON/JSONL files.

A :class:`ChoiceItem` is one multiple-choice item for a causal LM: a prompt and candidate
continuations, scored by the total log-probability of each continuation given the prompt.
Loaders keep the context apart from the context-free question, so the same item also feeds
IRCAN localization (path from the prompt without context to the prompt with context).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kn_steer.errors import DataError
from kn_steer.fileio import read_jsonl, sha256_file

#: The neutral premise of calibrated scoring (:mod:`kn_steer.eval.scoring`): a bare answer cue that
#: says nothing about the question, so ``log P(choice | NEUTRAL_PROMPT)`` measures what the model
#: thinks of the choice on its own (its length, its prior frequency).
NEUTRAL_PROMPT = "Answer:"


@dataclass(frozen=True)
class ChoiceItem:
    """One item: ``prompt`` + each of ``choices`` is a candidate text.

    ``faithful`` is the index of the context-faithful choice (the one counted as correct);
    ``trap`` the index of the memorised answer the context argues against (None when absent).
    ``context`` and ``question_prompt`` are the two halves IRCAN needs: ``prompt`` is exactly
    ``context + question_prompt`` (the context keeps its trailing separator), and
    ``question_prompt`` alone is the item with the context left out.
    """

    id: str
    prompt: str
    choices: tuple[str, ...]
    faithful: int
    trap: int | None
    context: str
    question_prompt: str


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def read_json_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) from a JSON array of objects, or from JSONL.

    The array is decoded element by element so each record keeps the line it starts on, and
    an error message can point at it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from exc
    stripped = text.lstrip()
    if not stripped.startswith("["):
        yield from read_jsonl(path)
        return
    decoder = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{_where(path, line_of(exc.pos))}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{_where(path, line_of(pos))}: expected a JSON object, got {type(obj).__name__}")
        yield line_of(pos), obj
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataError(f"{_where(path, line_of(pos))}: expected ',' or ']' in the JSON array")


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path, line: int) -> Any:
    """``obj[name]`` checked for presence and type; errors name the file, line and field."""
    if name not in obj:
        raise DataError(f"{_where(path, line)}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{_where(path, line)}: field {name!r} should be {want}, got {type(value).__name__}")
    return value


def content_sha256(path: str | Path) -> str:
    """sha256 of a data file, or of a folder's files (relative names and contents, sorted): what a
    result computed from ``path`` depends on."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise DataError(f"no data file or folder at {path}")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()
