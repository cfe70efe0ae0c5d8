"""Two prompt sets to contrast, for difference-of-means directions.

* ``refusal`` (``../shared/data/refusal``, Arditi et al.'s splits): ``harmful_{train,val}.json`` and
  ``harmless_{train,val}.json``, lists of ``{instruction, category}``. Harmful instructions are the
  positive class. AdvBench is MIT; the harmless side is Alpaca (CC BY-NC 4.0): read it, never ship it
  or anything copied from it.
* ``truthfulqa`` (``../shared/data/truthfulqa/TruthfulQA.csv``): each question with its best answer
  (positive) and its first incorrect answer (negative), as ``Q: ...\\nA: ...`` texts.

Splits: a loader returns the items of one file in order; callers take disjoint ranges of them (the
direction's ``train`` items, then its layer-selection items), so ``val`` files stay unseen.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kn_steer.data.common import field, read_json_records
from kn_steer.errors import DataError

REFUSAL_SPLITS = ("train", "val")


@dataclass(frozen=True)
class Contrast:
    """``positive[i]`` and ``negative[i]``: texts of the two classes (not paired unless the source pairs them)."""

    positive: list[str]
    negative: list[str]

    def take(self, start: int, count: int) -> "Contrast":
        return Contrast(self.positive[start:start + count], self.negative[start:start + count])


def _instructions(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: no such file (a refusal folder holds harmful_/harmless_{{train,val}}.json)")
    return [field(obj, "instruction", str, path, line) for line, obj in read_json_records(path)]


def load_refusal(folder: str | Path, split: str = "train") -> Contrast:
    """Harmful (positive) and harmless (negative) instructions of one split."""
    if split not in REFUSAL_SPLITS:
        raise DataError(f"refusal split must be one of {', '.join(REFUSAL_SPLITS)}, not {split!r}")
    folder = Path(folder)
    return Contrast(_instructions(folder / f"harmful_{split}.json"), _instructions(folder / f"harmless_{split}.json"))


def qa_text(question: str, answer: str) -> str:
    return f"Q: {question.strip()}\nA: {answer.strip()}"


def load_truthfulqa(path: str | Path) -> Contrast:
    """Per question: ``Q/A`` with the best answer (positive) and with the first incorrect one (negative)."""
    path = Path(path)
    if path.is_dir():
        path = path / "TruthfulQA.csv"
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    positive, negative = [], []
    for n, row in enumerate(rows, start=2):
        try:
            question, best, wrong = row["Question"], row["Best Answer"], row["Incorrect Answers"]
        except KeyError as exc:
            raise DataError(f"{path}:{n}: missing column {exc.args[0]!r}") from None
        first_wrong = wrong.split(";")[0].strip()
        if question and best and first_wrong:
            positive.append(qa_text(question, best))
            negative.append(qa_text(question, first_wrong))
    if not positive:
        raise DataError(f"{path}: no question with a best and an incorrect answer")
    return Contrast(positive, negative)
