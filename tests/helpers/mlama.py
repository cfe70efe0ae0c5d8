"""A small mLAMA-style folder (facts/LANG.jsonl, templates/LANG.jsonl) of facts the default model knows.

The default model reads English only, so the "languages" here are English paraphrases under
language codes: what the multilingual method and protocol need is several queries per fact, each
with its own template and answer label.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers.pararel import FACTS

TEMPLATES = {
    "en": {"P36": "The capital of [X] is [Y] .", "P37": "The official language of [X] is [Y] .",
           "P27": "[X] is [Y] citizen ."},  # [Y] inside: refused
    "xx": {"P36": "The capital city of [X] is [Y].", "P37": "In [X], the official language is [Y]."},
    "yy": {"P36": "[X]'s capital city is [Y].", "P37": "The language spoken in [X] is [Y]."},
}


def write_mlama(folder: Path, templates: dict = TEMPLATES, relations: tuple[str, ...] = ("P36", "P37")) -> Path:
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    (folder / "facts").mkdir(exist_ok=True)
    for lang, by_relation in templates.items():
        (folder / "templates" / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"relation": r, "template": t}) + "\n" for r, t in by_relation.items()))
        lines = []
        for rel in relations:
            for k, (subject, obj) in enumerate(FACTS[rel][1]):
                lines.append({"relation": rel, "lineid": k, "sub_uri": f"Q{rel}{k}", "sub_label": subject,
                              "obj_uri": f"O{obj}", "obj_label": obj})
        (folder / "facts" / f"{lang}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder
