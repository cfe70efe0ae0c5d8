"""Emotion-concept data (``../shared/data/emotion``, Li et al.; GoEmotions, Demszky et al. 2020).

* ``attribute_scores.csv`` — 27 emotions x 14 human-rated attributes in [0, 1] (arousal,
  valence, six facial expressions, six appraisals): what the ``emotion-attribute`` method
  correlates neuron activations with. The ratings are the authors' data: credit them, never ship.
* ``goemotions_{dev,test}.jsonl`` — ``{id, text, labels}`` Reddit comments: the emotion-inference
  task, scored zero-shot as a multiple choice over the emotion names (:func:`inference_items`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from kn_steer.data.common import ChoiceItem, field, read_jsonl
from kn_steer.errors import DataError

#: The zero-shot emotion-inference prompt; each emotion name follows it after a space.
INFERENCE_TEMPLATE = 'Comment: "{text}"\nThe emotion expressed in this comment is'
#: The domain premise of calibrated scoring for that prompt (the same cue without a comment).
INFERENCE_PREMISE = "The emotion expressed in this comment is"
SPLITS = ("dev", "test")


@dataclass(frozen=True)
class EmotionAttributes:
    """``scores[e, a]``: the human rating of attribute ``attributes[a]`` for ``emotions[e]``."""

    emotions: list[str]
    attributes: list[str]
    scores: torch.Tensor  # [emotions, attributes] float64

    def column(self, attribute: str) -> torch.Tensor:
        if attribute not in self.attributes:
            raise DataError(f"unknown attribute {attribute!r}; the file rates: {', '.join(self.attributes)}")
        return self.scores[:, self.attributes.index(attribute)]


def load_attributes(folder: str | Path) -> EmotionAttributes:
    """The rating table of ``folder/attribute_scores.csv``, checked cell by cell."""
    path = Path(folder) / "attribute_scores.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    if len(rows) < 3 or not rows[0] or rows[0][0] != "emotion":
        raise DataError(f"{path}: expected a header 'emotion,<attribute>,...' and at least two emotions")
    attributes = [a.strip() for a in rows[0][1:]]
    if not attributes or len(set(attributes)) != len(attributes):
        raise DataError(f"{path}:1: attribute names must be present and distinct")
    emotions, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(attributes) + 1:
            raise DataError(f"{path}:{line}: {len(row)} cells, expected {len(attributes) + 1}")
        name = row[0].strip()
        if not name or name in emotions:
            raise DataError(f"{path}:{line}: emotion name missing or repeated ({name!r})")
        try:
            cells = [float(c) for c in row[1:]]
        except ValueError:
            raise DataError(f"{path}:{line}: every rating must be a number") from None
        # min-max normalised ratings: allow rounding (the file has -1.1e-16)
        if any(not math.isfinite(c) or not -1e-9 <= c <= 1.0 + 1e-9 for c in cells):
            raise DataError(f"{path}:{line}: ratings must lie in [0, 1]")
        emotions.append(name)
        values.append(cells)
    return EmotionAttributes(emotions, attributes, torch.tensor(values, dtype=torch.float64))


def inference_items(folder: str | Path, split: str, emotions: Sequence[str], limit: int | None = None
                    ) -> list[ChoiceItem]:
    """GoEmotions comments of ``split`` with exactly one label among ``emotions`` (the rest —
    neutral, several labels — are skipped), as multiple-choice items over ``emotions`` in order;
    the first ``limit`` in file order."""
    if split not in SPLITS:
        raise DataError(f"GoEmotions split must be one of {', '.join(SPLITS)}, not {split!r}")
    path = Path(folder) / f"goemotions_{split}.jsonl"
    choices = tuple(" " + e for e in emotions)
    items: list[ChoiceItem] = []
    for line, record in read_jsonl(path):
        text = field(record, "text", str, path, line).strip()
        labels = field(record, "labels", list, path, line)
        if len(labels) != 1 or labels[0] not in emotions or not text:
            continue
        prompt = INFERENCE_TEMPLATE.format(text=text)
        items.append(ChoiceItem(id=str(field(record, "id", (str, int), path, line)), prompt=prompt, choices=choices,
                                faithful=list(emotions).index(labels[0]), trap=None, context="",
                                question_prompt=prompt))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no comment with exactly one label among the {len(emotions)} emotions")
    return items


__all__ = ["EmotionAttributes", "INFERENCE_PREMISE", "INFERENCE_TEMPLATE", "inference_items", "load_attributes"]
