"""Examples of per-example methods: the common base model and its generic JSONL reader.

One example per line, validated by the method's example model (e.g.
:class:`kn_steer.localize.methods.kn.KNExample`). ``id`` is optional; a missing one becomes
``<file name>:<line>``. Ids must be unique in a file because resumable runs key finished
examples by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kn_steer.errors import DataError
from kn_steer.fileio import read_jsonl
from kn_steer.tokens import continuation_ids


class Example(BaseModel):
    """What every example has: an id, the target text and free-form metadata."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    target: str  # must tokenize to at least one token (checked with the tokenizer)
    meta: dict[str, Any] = Field(default_factory=dict)  # free-form (relation, source, ...)

    def key_text(self) -> str:
        """Canonical JSON of the example, hashed by resumable runs to spot changed examples."""
        return json.dumps(self.model_dump(exclude={"meta"}), sort_keys=True, ensure_ascii=False)


E = TypeVar("E", bound=Example)


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as short 'missing field / unknown field / field: message' phrases."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(line)"
        if err["type"] == "missing":
            parts.append(f"missing field {field!r}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r}")
        else:
            parts.append(f"field {field!r}: {err['msg']}")
    return "; ".join(parts)


def load_examples(path: str | Path, model: type[E], limit: int | None = None) -> list[E]:
    """Read a JSONL file of ``model`` examples; a bad line raises DataError naming file and line."""
    path = Path(path)
    examples: list[E] = []
    seen: dict[str, int] = {}
    for number, raw in read_jsonl(path):
        try:
            example = model.model_validate(raw)
        except ValidationError as exc:
            raise DataError(f"{path}:{number}: {describe_validation(exc)}") from exc
        if example.id is None:
            example.id = f"{path.name}:{number}"
        if example.id in seen:
            raise DataError(f"{path}:{number}: id {example.id!r} already used on line {seen[example.id]}")
        seen[example.id] = number
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def check_targets(examples: Iterable[Example], tokenizer: Any, source: str = "") -> None:
    """Every target must tokenize to at least one token (checked before any compute)."""
    for ex in examples:
        try:
            continuation_ids(tokenizer, ex.target)
        except DataError:
            where = f"{source}: " if source else ""
            raise DataError(f"{where}example {ex.id!r}: target {ex.target!r} tokenizes to no token") from None
