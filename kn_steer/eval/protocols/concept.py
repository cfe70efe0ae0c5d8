"""Does clamping a concept's neurons make the model talk about it? (Davies et al.: clamping the "dog"
neuron of Llama-3.1-8B makes it always talk about dogs.)

Questions that invite a free choice ("What is your favourite animal?" and paraphrases) are sampled
many times unsteered, with the concept set clamped to each value, and with random neurons of the
same layers clamped to the same value (``seeds`` draws). An answer counts when it names the concept
(any of ``words``, whole words, any case). Each condition is compared with unsteered (chi-square, or
Fisher exact for small counts: :func:`kn_steer.stats.compare_binary`), and the set with each control.

``generate(spec, questions, samples)`` returns, per question, ``samples`` answers: a driver passes the
serving path (vLLM with the plugin) or any other generator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from kn_steer.eval.controls import matched_neurons, neuron_spec
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet
from kn_steer.stats import compare_binary

Generate = Callable[[dict[str, Any] | None, Sequence[str], int], list[list[str]]]

QUESTIONS = (
    "What is your favourite animal?",
    "If you could be any animal, which would you be?",
    "Name an animal you like.",
    "Which animal would you choose as a pet?",
    "Tell me about your favourite creature.",
)


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether ``text`` names any of ``words`` as a whole word (any case)."""
    return any(re.search(rf"\b{re.escape(w)}\b", text, flags=re.IGNORECASE) for w in words)


def _count(answers: list[list[str]], words: Sequence[str]) -> int:
    return sum(mentions(a, words) for per_question in answers for a in per_question)


def run(generate: Generate, neurons: Sequence[tuple[int, int]], shape: ModelShape, values: Sequence[float],
        words: Sequence[str], questions: Sequence[str] = QUESTIONS, samples: int = 20, seeds: int = 3,
        progress: bool = True, examples: int = 3) -> dict[str, Any]:
    """Counts of answers naming the concept per condition, with the tests; JSON-ready."""
    n = len(questions) * samples
    conditions: list[tuple[str, float | None, int | None, dict[str, Any] | None]] = [("unsteered", None, None, None)]
    for value in values:
        conditions.append(("set", value, None, neuron_spec(neurons, "clamp", value=value)))
        conditions += [("matched", value, s, neuron_spec(matched_neurons(neurons, shape, s), "clamp", value=value))
                       for s in range(seeds)]
    counts: dict[tuple[str, float | None, int | None], int] = {}
    shown: dict[str, list[str]] = {}
    for kind, value, seed, spec in tqdm(conditions, desc="concept conditions", disable=not progress):
        answers = generate(spec, questions, samples)
        counts[(kind, value, seed)] = _count(answers, words)
        if seed in (None, 0):
            shown[f"{kind}" + ("" if value is None else f"@{value:g}")] = [a[0] for a in answers[:examples]]
    base = counts[("unsteered", None, None)]
    rows = []
    for value in values:
        mine = counts[("set", value, None)]
        ctrl = [counts[("matched", value, s)] for s in range(seeds)]
        rows.append({
            "value": value, "set": mine / n, "set_count": mine,
            "p_set_vs_unsteered": compare_binary(mine, n, base, n).p_value,
            "matched": [c / n for c in ctrl],
            "p_matched_vs_unsteered": [compare_binary(c, n, base, n).p_value for c in ctrl],
            "p_set_vs_matched": [compare_binary(mine, n, c, n).p_value for c in ctrl],
        })
    return {"protocol": "concept-clamp", "neurons": [list(p) for p in neurons], "words": list(words),
            "questions": list(questions), "samples_per_question": samples, "n": n, "seeds": seeds,
            "unsteered": base / n, "unsteered_count": base, "rows": rows, "examples": shown}


def build_set(model: Any, tokenizer: Any, ref: Any, word: str, top: int, max_rank: int, value: float,
              out: Path, *, name: str, description: str, metrics: dict[str, Any],
              command_out: str | None = None) -> NeuronSet:
    """The concept set, written by the library's ``concept`` method (``provenance.command``
    recomputes it from the weights)."""
    from kn_steer.localize.command import localize_command, model_argument
    from kn_steer.localize.methods.concept import CONCEPT
    from kn_steer.localize.runner import RunInfo, run_localization

    params = CONCEPT.parse_params({"word": word, "top": top, "max_rank": max_rank, "value": value})
    command = localize_command(CONCEPT.name, params, None, None, command_out or str(out), name=name,
                               model=model_argument(ref))
    return run_localization(CONCEPT, params, None, model, tokenizer, ref, out,
                            RunInfo(name=name, description=description, command=command, metrics=metrics),
                            progress=False)


__all__ = ["QUESTIONS", "build_set", "mentions", "run"]
