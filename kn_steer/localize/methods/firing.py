"""``dead`` and ``token``: neurons found by how often they fire on plain text (corpus methods;
Voita et al., "Neurons in LLMs: dead, n-gram, positional").

* ``dead`` — the neurons that never fire over the corpus ("fires" per family:
  :func:`kn_steer.models.sites.hook_firing`). Gated SiLU/GELU MLPs have no exact zero, so a dead
  neuron's gate never opens but its value is not exactly 0: clamping the set to 0 measures what
  these near-silent neurons still contribute.
* ``token`` — detectors of one token: the neurons whose firings best coincide with the token
  (any single-token spelling of ``--token``), scored by the F1 of "fires" as a detector of "this
  position is the token" (precision: share of the neuron's firings on the token; recall: share of
  the token's occurrences it fires on).

The corpus is a text JSONL (``text`` per line, e.g. ``../shared/data/english/ewt_paragraphs.jsonl``),
its first ``texts`` non-blank records, each cut to ``max_tokens`` tokens; special tokens are not
counted. The census of all three kinds, with the removal test, is
:mod:`kn_steer.eval.protocols.neuron_census`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from kn_steer.data.text import load_texts
from kn_steer.errors import KnSteerError
from kn_steer.localize.firing import count_firing, firing_counts
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.localize.ranking import top_flat
from kn_steer.localize.vocabulary import concept_token_ids
from kn_steer.sets.format import Neuron, Operation
from kn_steer.tokens import pad_id, prompt_ids


class TextCorpus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    source: str = ""


class _TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: int = Field(1604, ge=1, description="corpus: the first N non-blank texts")
    max_tokens: int = Field(64, ge=1, description="tokens read per text")
    value: float = Field(0.0, description="default operation: clamp to this value")
    batch_size: int = Field(16, ge=1, description="texts per forward")


class DeadParams(_TextParams):
    pass


class TokenParams(_TextParams):
    token: str = Field(description="the token detected (a word the tokenizer keeps whole in some spelling)")
    top: int = Field(10, ge=1, description="neurons in the set: the top N by F1")
    min_fires: int = Field(5, ge=1, description="firings on the token a neuron needs to be kept")


def load_corpus(path: Path, format: str, params: _TextParams, limit: int | None = None) -> TextCorpus:
    if limit is not None:
        raise KnSteerError("--limit does not apply here; use --texts")
    return TextCorpus(prompts=[t.text for t in load_texts(path, params.texts)], source=str(path))


def accumulate_dead(ctx: Context, corpus: TextCorpus, params: DeadParams) -> CorpusStats:
    counts, tokens = firing_counts(ctx.model, ctx.tokenizer, corpus.prompts, params.max_tokens, params.batch_size)
    return CorpusStats(scores=-counts.float(), info={"tokens": tokens, "fires": counts})


def select_dead(stats: CorpusStats, params: DeadParams) -> Selection:
    fires = stats.info["fires"]
    dead = (fires == 0).nonzero().tolist()
    if not dead:
        raise KnSteerError(f"no neuron is dead over these {stats.info['tokens']} tokens")
    per_layer = (fires == 0).sum(1).tolist()
    return Selection(neurons=[Neuron(layer=l, index=i, score=0.0) for l, i in dead],
                     operation=Operation(op="clamp", value=params.value),
                     metrics={"tokens": stats.info["tokens"], "dead_per_layer": per_layer,
                              "dead_share": len(dead) / fires.numel()})


def accumulate_token(ctx: Context, corpus: TextCorpus, params: TokenParams) -> CorpusStats:
    ids = set(concept_token_ids(ctx.tokenizer, params.token))
    specials = set(getattr(ctx.tokenizer, "all_special_ids", []) or [])
    rows = [prompt_ids(ctx.tokenizer, t)[:params.max_tokens] for t in corpus.prompts]
    on_token = [[tok in ids for tok in row] for row in rows]
    occurrences = sum(map(sum, on_token))
    if occurrences == 0:
        raise KnSteerError(f"{params.token!r} never occurs in {corpus.source or 'the corpus'}")
    pad = pad_id(ctx.tokenizer)
    hits = count_firing(ctx.model, rows, on_token, pad, params.batch_size).per_token.float()
    total = count_firing(ctx.model, rows, [[tok not in specials for tok in row] for row in rows], pad,
                         params.batch_size).per_token.float()
    precision = hits / total.clamp_min(1)
    recall = hits / occurrences
    f1 = torch.where(hits >= params.min_fires, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(hits))
    return CorpusStats(scores=f1, info={"token_ids": sorted(ids), "occurrences": occurrences,
                                        "precision": precision, "recall": recall})


def select_token(stats: CorpusStats, params: TokenParams) -> Selection:
    chosen = [(l, i, s) for l, i, s in top_flat(stats.scores, params.top) if s > 0]
    if not chosen:
        raise KnSteerError(f"no neuron fires {params.min_fires} times on {params.token!r}")
    precision, recall = stats.info["precision"], stats.info["recall"]
    return Selection(
        neurons=[Neuron(layer=l, index=i, score=s) for l, i, s in chosen],
        operation=Operation(op="clamp", value=params.value),
        metrics={"token": params.token, "token_ids": stats.info["token_ids"], "occurrences": stats.info["occurrences"],
                 "precision": [round(float(precision[l, i]), 4) for l, i, _ in chosen],
                 "recall": [round(float(recall[l, i]), 4) for l, i, _ in chosen]},
    )


DEAD = CorpusMethod(
    name="dead", description="neurons that never fire over a text corpus (Voita et al.)",
    params_model=DeadParams, corpus_model=TextCorpus, load_corpus=load_corpus,
    accumulate=accumulate_dead, select=select_dead, formats=("text",),
)

TOKEN = CorpusMethod(
    name="token", description="detectors of one token: firing as a detector of the token, by F1 (Voita et al.)",
    params_model=TokenParams, corpus_model=TextCorpus, load_corpus=load_corpus,
    accumulate=accumulate_token, select=select_token, formats=("text",),
)
