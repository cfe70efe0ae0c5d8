"""Plain text for measures that need natural language, not tasks (perplexity under steering).

A text file is JSONL with a ``text`` field per line (``../shared/data/english`` has UD EWT and
GUM sentences and paragraphs in this shape); ``id`` or ``par_id`` name a record when present.
Blank texts are skipped, so a limit counts usable texts. A ``group_field`` (e.g. ``lang``) puts
each text in a group that corpus statistics count apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kn_steer.data.common import field, read_jsonl
from kn_steer.errors import DataError


@dataclass(frozen=True)
class TextItem:
    id: str
    text: str
    group: str = ""


def load_texts(path: str | Path, limit: int | None = None, group_field: str | None = None) -> list[TextItem]:
    """The first ``limit`` non-blank texts of a JSONL file (all by default), each with its
    ``group_field`` value when one is named (a string; a record without it is an error)."""
    path = Path(path)
    out: list[TextItem] = []
    for line, record in read_jsonl(path, "text file"):
        text = field(record, "text", str, path, line)
        if not text.strip():
            continue
        group = field(record, group_field, str, path, line) if group_field else ""
        if group_field and not group.strip():
            raise DataError(f"{path}:{line}: field {group_field!r} is blank")
        out.append(TextItem(str(record.get("id", record.get("par_id", f"{path.name}:{line}"))), text, group))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no non-blank 'text' records")
    return out
