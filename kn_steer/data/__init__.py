"""Evaluation data loaders: every format becomes :class:`ChoiceItem` (and IRCAN examples).

``load_items(path, format)`` reads MemoTrap (``memotrap``) or COSE_KRE (``kre``) files as
published; ``load_ircan_examples(path, format)`` turns the same items into IRCAN localization
examples whose target is the context-faithful answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kn_steer.data.common import ChoiceItem
from kn_steer.errors import DataError

Format = Literal["memotrap", "kre"]
FORMATS: tuple[str, ...] = ("memotrap", "kre")


def load_items(path: str | Path, format: str) -> list[ChoiceItem]:
    """The items of a MemoTrap or COSE_KRE file."""
    if format == "memotrap":
        from kn_steer.data.memotrap import load_memotrap

        return load_memotrap(path)
    if format == "kre":
        from kn_steer.data.kre import load_kre

        return load_kre(path)
    raise DataError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")


def to_ircan_examples(items: list[ChoiceItem]) -> list:
    """IRCAN examples: model input ``context + prompt``, baseline ``prompt``, target = faithful choice."""
    from kn_steer.localize.examples import IRCANExample

    return [
        IRCANExample(id=item.id, context=item.context, prompt=item.question_prompt,
                     target=item.choices[item.faithful])
        for item in items
    ]


def load_ircan_examples(path: str | Path, format: str, limit: int | None = None) -> list:
    """A MemoTrap or COSE_KRE file as :class:`kn_steer.localize.examples.IRCANExample` list.

    For ``kn-steer localize --method ircan --format memotrap|kre``: the examples' full input is
    exactly the item's scored prompt, so neurons are found on what ``kn-steer eval`` scores.
    """
    items = load_items(path, format)
    if limit is not None:
        items = items[:limit]
    return to_ircan_examples(items)


def shared_data_dir() -> Path:
    """``../shared/data`` next to the project checkout (where the benchmarks look by default)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


__all__ = ["ChoiceItem", "FORMATS", "Format", "load_ircan_examples", "load_items", "shared_data_dir",
           "to_ircan_examples"]
