"""Spelling facts: "which letter does this word start with?" as knowledge-neuron examples.

For "Spelling-out is not straightforward" (knowledge neurons of a token's characters): words are
taken from any text JSONL (``../shared/data/english`` has UD EWT and GUM), lowercase alphabetic,
``min_length``-``max_length`` letters, in a stable hashed order; each becomes one fact per letter
position with :data:`TEMPLATES`' paraphrases, whose answer is the capital letter ("P").
The knowledge-neuron examples are built by ``kn_steer.eval.protocols.spelling``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from kn_steer.data.text import load_texts
from kn_steer.errors import DataError

#: paraphrases per letter position; ``{w}`` is the word. Each ends with an opening quote, and the
#: answer is the capital letter: SmolLM2-135M-Instruct answers "What is the first letter of ...?"
#: with ' "H"' (a plain "starts with the letter" gets ' "W"' or ' "B"', capital or not, right or not).
TEMPLATES = {
    "first": ['Q: What is the first letter of the word "{w}"?\nA: The first letter is "',
              'Question: Which letter does the word "{w}" start with?\nAnswer: It starts with "',
              'Q: Which letter does "{w}" begin with?\nA: "{w}" begins with the letter "'],
    "second": ['Q: What is the second letter of the word "{w}"?\nA: The second letter is "',
               'Question: Which letter comes second in the word "{w}"?\nAnswer: The second letter is "',
               'Q: What letter follows the first letter in "{w}"?\nA: It is "'],
}
POSITIONS = {"first": 0, "second": 1}
_WORD = re.compile(r"[a-z]+")


def load_words(path: str | Path, min_length: int = 4, max_length: int = 9) -> list[str]:
    """Distinct lowercase alphabetic words of a text JSONL (tokens written entirely in lowercase,
    so names and acronyms stay out), in a stable hashed order."""
    if min_length < 2 or max_length < min_length:
        raise DataError(f"word lengths must satisfy 2 <= min_length <= max_length, got {min_length}, {max_length}")
    words = {token for item in load_texts(path) for token in re.findall(r"[A-Za-z]+", item.text)
             if _WORD.fullmatch(token) and min_length <= len(token) <= max_length}
    if not words:
        raise DataError(f"{path}: no lowercase word of {min_length}-{max_length} letters")
    return sorted(words, key=lambda w: hashlib.sha256(f"spelling:{w}".encode()).digest())


def spelling_prompts(word: str, position: str, paraphrases: int = 3) -> tuple[list[str], str]:
    """The prompts asking for ``word``'s letter at ``position`` and the answer ("P")."""
    if position not in TEMPLATES:
        raise DataError(f"unknown letter position {position!r}; known: {', '.join(TEMPLATES)}")
    if len(word) <= POSITIONS[position]:
        raise DataError(f"{word!r} has no {position} letter")
    return [t.format(w=word) for t in TEMPLATES[position][:paraphrases]], word[POSITIONS[position]].upper()


__all__ = ["POSITIONS", "TEMPLATES", "load_words", "spelling_prompts"]
