"""The example models the localization methods consume, and their generic JSONL files.

One example per line. Knowledge neurons (Dai et al.)::

    {"id": "P36-Paris", "prompts": ["The capital of France is", "France's capital city is"], "target": " Paris"}

IRCAN (context-aware neurons)::

    {"id": "memotrap-0", "context": "Write a quote that ends in the word \\"kings\\": ",
     "prompt": "No man can serve two", "target": " kings"}

For IRCAN the model input is exactly ``context + prompt`` (no separator is inserted: put any
separator at the end of ``context``, as for MemoTrap where the context is the instruction up to and
including the last ``": "``); the context-free baseline input is ``prompt`` alone. Dataset loaders
(``kn_steer.data``) convert benchmark files into these models.

``id`` is optional; a missing one becomes ``<file name>:<line>``. Ids must be unique in a file
because resumable runs key finished examples by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kn_steer.errors import DataError
from kn_steer.fileio import read_jsonl


class _Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    target: str  # must tokenize to at least one token (checked with the tokenizer)
    meta: dict[str, Any] = Field(default_factory=dict)  # free-form (relation, source, ...)

    def key_text(self) -> str:
        """Canonical JSON of the example, hashed by resumable runs to spot changed examples."""
        return json.dumps(self.model_dump(exclude={"meta"}), sort_keys=True, ensure_ascii=False)


class KNExample(_Example):
    """One fact: paraphrased prompts that should all be completed by ``target``."""

    prompts: list[str] = Field(min_length=1)

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, prompts: list[str]) -> list[str]:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return prompts


class IRCANExample(_Example):
    """A context, a question/prompt, and the context-faithful answer."""

    context: str = Field(min_length=1)
    prompt: str = Field(min_length=1)

    @property
    def full_prompt(self) -> str:
        return self.context + self.prompt


E = TypeVar("E", bound=_Example)


def _describe(exc: ValidationError) -> str:
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
            raise DataError(f"{path}:{number}: {_describe(exc)}") from exc
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


def check_targets(examples: Iterable[_Example], tokenizer: Any, source: str = "") -> None:
    """Every target must tokenize to at least one token (checked before any compute)."""
    for ex in examples:
        if not tokenizer(ex.target, add_special_tokens=False)["input_ids"]:  # = kn_steer.tokens.continuation_ids
            where = f"{source}: " if source else ""
            raise DataError(f"{where}example {ex.id!r}: target {ex.target!r} tokenizes to no token")


def load_kn_examples(path: str | Path, limit: int | None = None) -> list[KNExample]:
    return load_examples(path, KNExample, limit)


def load_ircan_examples(path: str | Path, limit: int | None = None) -> list[IRCANExample]:
    return load_examples(path, IRCANExample, limit)
