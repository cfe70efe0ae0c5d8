"""Parallel text: the same sentences in several languages (``../shared/data/pud``).

A folder holds one ``LANG.jsonl`` per language with ``{"id", "text"}``, the same ids in the same
order in every file. Splits are by position in that order, so a sentence and all its translations
fall on the same side: the first ``train`` sentences are the localization split, the rest held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kn_steer.data.common import field, read_jsonl
from kn_steer.errors import DataError


@dataclass(frozen=True)
class ParallelText:
    """Aligned sentences: ``texts[lang][i]`` is sentence ``ids[i]`` in ``lang``."""

    ids: list[str]
    texts: dict[str, list[str]]

    @property
    def languages(self) -> list[str]:
        return list(self.texts)

    def split(self, train: int, part: str) -> "ParallelText":
        """``part`` "train": the first ``train`` sentences; "test": the others."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', not {part!r}")
        if not 0 < train < len(self.ids):
            raise DataError(f"a train split of {train} leaves nothing on one side of {len(self.ids)} sentences")
        cut = slice(0, train) if part == "train" else slice(train, None)
        return ParallelText(self.ids[cut], {lang: texts[cut] for lang, texts in self.texts.items()})


def available_languages(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: a parallel-text folder (one LANG.jsonl per language) was expected")
    found = sorted(p.stem for p in path.glob("*.jsonl"))
    if not found:
        raise DataError(f"{path}: no LANG.jsonl files")
    return found


def load_parallel(path: str | Path, languages: Sequence[str] | None = None) -> ParallelText:
    """The folder's sentences in ``languages`` (all by default), checked to be aligned."""
    path = Path(path)
    have = available_languages(path)
    wanted = list(languages) if languages else have
    missing = [lang for lang in wanted if lang not in have]
    if missing:
        raise DataError(f"{path}: no file for language(s) {', '.join(missing)} (have: {', '.join(have)})")
    ids: list[str] | None = None
    texts: dict[str, list[str]] = {}
    for lang in wanted:
        file = path / f"{lang}.jsonl"
        rows = [(str(field(r, "id", (str, int), file, line)), field(r, "text", str, file, line))
                for line, r in read_jsonl(file, "parallel text")]
        these = [i for i, _ in rows]
        if ids is None:
            ids = these
        elif these != ids:
            raise DataError(f"{file}: its ids differ from {wanted[0]}.jsonl's (the files must be aligned)")
        texts[lang] = [t for _, t in rows]
    assert ids is not None
    return ParallelText(ids, texts)
