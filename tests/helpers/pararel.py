"""A small PARAREL-style folder (patterns/ and facts/) of facts the default model knows."""

from __future__ import annotations

import json
from pathlib import Path

FACTS = {
    "P36": ("The capital of [X] is [Y].", [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"),
                                           ("Spain", "Madrid"), ("Germany", "Berlin"), ("Russia", "Moscow"),
                                           ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"),
                                           ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Ireland", "Dublin")]),
    "P37": ("The official language of [X] is [Y].", [("Spain", "Spanish"), ("Brazil", "Portuguese"),
                                                     ("Italy", "Italian"), ("Greece", "Greek"), ("France", "French"),
                                                     ("Germany", "German"), ("Japan", "Japanese"),
                                                     ("Russia", "Russian"), ("Poland", "Polish"),
                                                     ("Portugal", "Portuguese"), ("Sweden", "Swedish"),
                                                     ("Finland", "Finnish")]),
    "P30": ("[X] is located in the continent of [Y].", [("Kenya", "Africa"), ("Peru", "South America"),
                                                         ("Norway", "Europe"), ("China", "Asia"),
                                                         ("Chile", "South America"), ("Egypt", "Africa"),
                                                         ("India", "Asia"), ("France", "Europe")]),
}


def write_pararel(folder: Path, facts: dict = FACTS) -> Path:
    (folder / "patterns").mkdir(parents=True, exist_ok=True)
    (folder / "facts").mkdir(exist_ok=True)
    for rel, (pattern, pairs) in facts.items():  # one pattern, or a list of paraphrased patterns
        patterns = pattern if isinstance(pattern, list) else [pattern]
        (folder / "patterns" / f"{rel}.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in patterns))
        (folder / "facts" / f"{rel}.jsonl").write_text(
            "".join(json.dumps({"sub_label": s, "obj_label": o, "uuid": f"{rel}-{s}"}) + "\n" for s, o in pairs))
    return folder
