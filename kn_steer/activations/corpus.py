"""A corpus as the model sees it: token-id rows and the group each row counts in.

Every backend counts the same tokens: each text tokenized as a prompt at inference
(:func:`kn_steer.tokens.prompt_ids`, ``<bos>`` included where the model wants it), cut to its
first ``max_tokens`` tokens. Texts without a group count in :data:`DEFAULT_GROUP`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kn_steer.data.text import TextItem
from kn_steer.errors import DataError
from kn_steer.tokens import prompt_ids

DEFAULT_GROUP = "corpus"
MAX_GROUPS = 60  # the engine keeps 64 groups of live statistics; a few stay for live traffic


@dataclass(frozen=True)
class TokenCorpus:
    """``rows[i]``: the ids of text ``i``; ``group_of[i]``: its index in ``groups``."""

    rows: list[list[int]]
    group_of: list[int]
    groups: list[str]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.rows))

    def counts(self, positions: str) -> tuple[list[int], list[int]]:
        """Per group: tokens counted (every token, or one per text for ``last``) and texts."""
        tokens, texts = [0] * len(self.groups), [0] * len(self.groups)
        for row, g in zip(self.rows, self.group_of):
            tokens[g] += len(row) if positions == "all" else 1
            texts[g] += 1
        return tokens, texts


def token_corpus(tokenizer: Any, texts: Sequence[TextItem], max_tokens: int) -> TokenCorpus:
    """Tokenize ``texts``; groups in order of first appearance."""
    groups: dict[str, int] = {}
    rows, group_of = [], []
    for item in texts:
        rows.append(prompt_ids(tokenizer, item.text)[:max_tokens])
        group_of.append(groups.setdefault(item.group or DEFAULT_GROUP, len(groups)))
    if len(groups) > MAX_GROUPS:
        raise DataError(f"{len(groups)} groups: corpus statistics count at most {MAX_GROUPS} groups at once")
    return TokenCorpus(rows, group_of, list(groups))
