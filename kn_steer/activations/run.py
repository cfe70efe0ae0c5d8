"""One corpus-statistics run: texts in, :class:`ActivationStats` out, on either backend.

The backend is an :class:`kn_steer.activations.engine.ActivationEngine` (vLLM) or a loaded
transformers model; both count the same tokens of the same :class:`TokenCorpus`.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from kn_steer.activations.corpus import By, by_position, by_token, token_corpus
from kn_steer.activations.format import ActivationStats, StatsHeader
from kn_steer.activations.reference import reference_stats
from kn_steer.data.common import content_sha256
from kn_steer.data.text import TextItem
from kn_steer.sets.format import ModelIdentity


def corpus_stats(texts: Sequence[TextItem], identity: ModelIdentity, *, engine: Any = None, model: Any = None,
                 tokenizer: Any = None, threshold: float = 0.0, positions: Literal["all", "last"] = "all",
                 max_tokens: int = 64, batch_size: int = 16, progress: bool = True, data_file: str | None = None,
                 group_field: str | None = None, command: str | None = None, by: By = "text",
                 top_tokens: int = 100) -> ActivationStats:
    """Count ``texts`` on ``engine`` (vLLM) when given, else on ``model`` (transformers); per group
    of texts, or per token position or token id (``by``; the ``top_tokens`` most frequent ids)."""
    tokenizer = engine.tokenizer if engine is not None else tokenizer
    corpus = token_corpus(tokenizer, texts, max_tokens)
    if by == "position":
        corpus = by_position(corpus)
    elif by == "token":
        corpus = by_token(corpus, tokenizer, top_tokens)
    bar = tqdm(total=len(texts), desc=f"activation stats ({'vllm' if engine is not None else 'hf'})",
               unit="text", disable=not progress)
    try:
        if engine is not None:
            if engine.threshold != threshold:
                raise ValueError(f"the engine counts firing above {engine.threshold}, not {threshold}")
            count = engine.token_stats if positions == "all" else engine.last_stats
            arrays = count(corpus, progress=bar.update)
        else:
            arrays = {k: v.numpy() for k, v in reference_stats(model, tokenizer, corpus, threshold, positions,
                                                                batch_size, progress=bar.update).items()}
    finally:
        bar.close()
    tokens, counted_texts = corpus.counts(positions)
    header = StatsHeader(
        model=identity, groups=corpus.groups, tokens=tokens, texts=counted_texts, threshold=threshold,
        positions=positions, max_tokens=max_tokens, backend="vllm" if engine is not None else "hf",
        data_file=data_file, data_sha256=content_sha256(data_file) if data_file else None,
        group_field=group_field, by=corpus.by, keys=corpus.keys, command=command,
    )
    return ActivationStats(header, np.rint(arrays["fires"]).astype(np.int64), arrays["sums"], arrays["maxes"])
