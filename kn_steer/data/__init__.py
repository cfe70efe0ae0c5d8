"""Evaluation data loaders: they read files and return plain items; nothing here computes.

``load_items(path, format)`` reads MemoTrap (``memotrap``) or COSE_KRE (``kre``) files as
published into :class:`ChoiceItem` lists; :mod:`kn_steer.data.pararel` reads PARAREL folders.
Turning items into a method's examples is the method's job (e.g.
:func:`kn_steer.localize.methods.ircan.examples_from_items`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kn_steer.data.common import ChoiceItem, content_sha256, read_json_records
from kn_steer.data.kre import load_kre
from kn_steer.data.memotrap import load_memotrap
from kn_steer.errors import DataError

Format = Literal["memotrap", "kre"]
FORMATS: tuple[str, ...] = ("memotrap", "kre")


def load_items(path: str | Path, format: str) -> list[ChoiceItem]:
    """The items of a MemoTrap or COSE_KRE file."""
    if format == "memotrap":
        return load_memotrap(path)
    if format == "kre":
        return load_kre(path)
    raise DataError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")


def detect_format(path: str | Path) -> str:
    """The format of a multiple-choice file from its first record's fields (any file name)."""
    for line, record in read_json_records(path):
        if "classes" in record and "answer_index" in record:
            return "memotrap"
        if "negative_context" in record and "candidate" in record:
            return "kre"
        raise DataError(f"{path}:{line}: cannot tell the format: expected MemoTrap fields "
                        "(prompt, classes, answer_index) or COSE_KRE fields (question, choices, answer, "
                        "candidate, negative_context)")
    raise DataError(f"{path}: no records")


def shared_data_dir() -> Path:
    """``../shared/data`` next to the project checkout (where the benchmarks look by default)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


__all__ = ["ChoiceItem", "FORMATS", "Format", "content_sha256", "detect_format", "load_items", "shared_data_dir"]
