"""Does activating one language's neurons make the model continue in that language? (LAPE's
steering claim, on a multilingual model.)

English prompts (held-out sentence openings) are continued greedily, unsteered and with language
``L``'s neurons clamped to ``dose`` times their own mean activation on ``L``'s text (each neuron
its own value: "activated as it is when reading L"), against matched random neurons (the set's
per-layer counts) treated the same way (each clamped to ``dose`` times its own mean on ``L``).
A continuation counts as ``L`` when most of its letters are in ``L``'s script, so only languages
with a script of their own are measured (:data:`SCRIPTS`); Latin-script languages would need a
language identifier. Generation is the caller's (the serving path, for the shipped demonstration).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.eval.controls import matched_neurons
from kn_steer.models.families import ModelShape
from kn_steer.stats import compare_binary

#: ``generate(spec or None, prompts) -> one continuation per prompt``
Generate = Callable[[dict[str, Any] | None, Sequence[str]], list[str]]

_KANA = r"\u3040-\u30ff"
SCRIPTS = {  # language -> the letters that identify it
    "ru": r"\u0400-\u04ff", "zh": r"\u4e00-\u9fff", "ja": _KANA, "ar": r"\u0600-\u06ff",
    "hi": r"\u0900-\u097f", "ko": r"\uac00-\ud7af\u1100-\u11ff", "th": r"\u0e00-\u0e7f",
}


def script_share(text: str, lang: str) -> float:
    """The share of ``text``'s letters written in ``lang``'s script."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    pattern = re.compile(f"[{SCRIPTS[lang]}]")
    return sum(bool(pattern.match(c)) for c in letters) / len(letters)


def in_language(text: str, lang: str) -> bool:
    """Whether a continuation is (mostly) in ``lang``: most letters in its script; Japanese needs
    kana on a fifth of its letters (it mixes in Han), Chinese needs Han and next to no kana."""
    if lang not in SCRIPTS:
        raise ValueError(f"no script rule for {lang!r}; measured: {', '.join(SCRIPTS)}")
    if lang == "ja":
        return script_share(text, "ja") >= 0.2
    if lang == "zh":
        return script_share(text, "zh") >= 0.5 and script_share(text, "ja") < 0.05
    return script_share(text, lang) >= 0.5


def activation_spec(neurons: Sequence[tuple[int, int]], means: Mapping[int, torch.Tensor], dose: float
                    ) -> dict[str, Any] | None:
    """Clamp each neuron to ``dose`` x its own mean activation (``means[layer][index]``)."""
    if not neurons:
        return None
    return {"interventions": [{"neurons": [[l, i]], "op": "clamp", "value": round(dose * float(means[l][i]), 6)}
                              for l, i in neurons]}


def run(generate: Generate, prompts: Sequence[str], sets: Mapping[str, Sequence[tuple[int, int]]],
        means: Mapping[str, Mapping[int, torch.Tensor]], shape: ModelShape, doses: Sequence[float],
        seeds: int = 1, progress: bool = True, examples: int = 3) -> dict[str, Any]:
    """Per language and dose: continuations in that language, set vs unsteered vs matched random;
    JSON-ready. ``means[lang][layer]``: every neuron's mean activation on ``lang``'s text."""
    n = len(prompts)
    unsteered = generate(None, prompts)
    table: dict[str, Any] = {}
    shown: dict[str, list[str]] = {"unsteered": unsteered[:examples]}
    plan = [(lang, dose) for lang in sets for dose in doses]
    for lang, dose in tqdm(plan, desc="language steering", disable=not progress):
        base = sum(in_language(t, lang) for t in unsteered)
        mine = generate(activation_spec(sets[lang], means[lang], dose), prompts)
        hits = sum(in_language(t, lang) for t in mine)
        controls = []
        for seed in range(seeds):
            chosen = matched_neurons(sets[lang], shape, seed)
            texts = generate(activation_spec(chosen, means[lang], dose), prompts)
            controls.append(sum(in_language(t, lang) for t in texts))
            if seed == 0:
                shown[f"matched {lang}@{dose:g}"] = texts[:examples]
        shown[f"{lang}@{dose:g}"] = mine[:examples]
        table.setdefault(lang, {"neurons": len(sets[lang]), "unsteered": base / n, "doses": []})["doses"].append({
            "dose": dose, "set": hits / n, "p_set_vs_unsteered": compare_binary(hits, n, base, n).p_value,
            "matched": [c / n for c in controls],
            "p_set_vs_matched": [compare_binary(hits, n, c, n).p_value for c in controls],
            "script_share": sum(script_share(t, lang) for t in mine) / n,
        })
    return {"protocol": "language-steering", "prompts": list(prompts), "n": n, "seeds": seeds,
            "languages": table, "examples": shown}


__all__ = ["SCRIPTS", "activation_spec", "in_language", "run", "script_share"]
