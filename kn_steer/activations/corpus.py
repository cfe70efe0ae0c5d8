"""A corpus as the model sees it: token-id rows and the group each row counts in.

Every backend counts the same tokens: each text tokenized as a prompt at inference
(:func:`kn_steer.tokens.prompt_ids`, ``<bos>`` included where the model wants it), cut to its
first ``max_tokens`` tokens. Texts without a group count in :data:`DEFAULT_GROUP`.

Summaries per token rather than per text (``kn-steer stats --by``) give every token its own group:
:func:`by_position` (the token's position in its text, ``<bos>`` at 0) or :func:`by_token` (its
token id, for the corpus's most frequent ids; the rest count in ``other``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

from kn_steer.data.text import TextItem
from kn_steer.errors import DataError
from kn_steer.tokens import prompt_ids

DEFAULT_GROUP = "corpus"
MAX_GROUPS = 60  # text groups: the engine keeps 64 groups of live statistics; a few stay for live traffic
MAX_TOKEN_GROUPS = 4096  # position or token-id groups (the engine is built with as many)
OTHER = "other"
By = Literal["text", "position", "token"]


@dataclass(frozen=True)
class TokenCorpus:
    """``rows[i]``: the ids of text ``i``; ``group_of[i]``: its index in ``groups``; where tokens
    count apart, ``token_groups[i][j]``: the group of its token ``j``, and ``keys[g]`` the
    position or token id group ``g`` stands for (-1: ``other``)."""

    rows: list[list[int]]
    group_of: list[int]
    groups: list[str]
    token_groups: list[list[int]] | None = None
    by: By = "text"
    keys: list[int] | None = None

    @property
    def tokens(self) -> int:
        return sum(map(len, self.rows))

    def row_groups(self, i: int) -> list[int]:
        """The group of each token of row ``i``."""
        if self.token_groups is not None:
            return self.token_groups[i]
        return [self.group_of[i]] * len(self.rows[i])

    def counts(self, positions: str) -> tuple[list[int], list[int]]:
        """Per group: tokens counted (every token, or one per text for ``last``) and texts with
        a counted token in it."""
        tokens, texts = [0] * len(self.groups), [0] * len(self.groups)
        for i, row in enumerate(self.rows):
            counted = self.row_groups(i) if positions == "all" else [self.row_groups(i)[-1]]
            for g, n in Counter(counted).items():
                tokens[g] += n
                texts[g] += 1
        return tokens, texts


def by_position(corpus: TokenCorpus) -> TokenCorpus:
    """Every token counts in the group of its position (``position 0`` is the first token)."""
    longest = max(map(len, corpus.rows), default=0)
    if longest > MAX_TOKEN_GROUPS:
        raise DataError(f"position summaries count at most {MAX_TOKEN_GROUPS} positions; cut texts with --max-tokens")
    return replace(corpus, groups=[f"position {p}" for p in range(longest)], keys=list(range(longest)),
                   token_groups=[list(range(len(row))) for row in corpus.rows], by="position")


def by_token(corpus: TokenCorpus, tokenizer: Any, top: int) -> TokenCorpus:
    """Every token counts in the group of its id, for the ``top`` most frequent ids of the corpus
    (ties: smaller id first); the rest in ``other``."""
    if not 1 <= top < MAX_TOKEN_GROUPS:
        raise DataError(f"token summaries keep 1 to {MAX_TOKEN_GROUPS - 1} token ids, got {top}")
    freq = Counter(t for row in corpus.rows for t in row)
    kept = sorted(freq, key=lambda t: (-freq[t], t))[:top]
    index = {t: g for g, t in enumerate(kept)}
    other = len(kept)
    groups = [f"{t} {tokenizer.decode([t])!r}" for t in kept]
    token_groups = [[index.get(t, other) for t in row] for row in corpus.rows]
    keys = list(kept)
    if len(freq) > len(kept):
        groups, keys = groups + [OTHER], keys + [-1]
    return replace(corpus, groups=groups, keys=keys, token_groups=token_groups, by="token")


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
