"""The MemoTrap file as an lm-eval dataset, through kn-steer's loader (no copy of the data here)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "memotrap" / "test.jsonl"


def load(data: str | None = None, **_: object):
    """A DatasetDict with one ``test`` split: prompt, choices, label (the context-faithful choice)."""
    import datasets

    from kn_steer.data import load_items

    path = Path(data or os.environ.get("KN_STEER_MEMOTRAP") or DEFAULT)
    items = load_items(path, "memotrap")
    rows = [{"id": it.id, "prompt": it.prompt, "choices": list(it.choices), "label": it.faithful} for it in items]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
