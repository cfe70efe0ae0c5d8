"""``relation``: relation-specific neurons, a corpus method.

Following the relation-specific neuron analysis of Liu et al. (2024), each MLP neuron is scored,
per relation ``r``, by the **average precision** of its activation at the last prompt token as a
detector of "this prompt asks for relation r" against the prompts of every other relation in the
corpus. The top ``count`` neurons by AP form the set; deactivating them (clamp to 0) should hurt
``r``'s facts much more than other relations' facts (measured by
:mod:`kn_steer.eval.protocols.relation`).

The corpus is built from a PARAREL folder under the parameters: the train split of facts
(:func:`kn_steer.data.pararel.fact_split`), ``facts_per_relation`` facts per relation with
``prompts_per_fact`` patterns each, over every relation with a usable pattern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.pararel import (
    FACTS_PER_RELATION,
    PROMPTS_PER_FACT,
    LabelledPrompt,
    load_pararel,
    relation_prompts,
)
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.localize.ranking import label_ap, top_flat
from kn_steer.localize.recorder import last_token_activations
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import Neuron, Operation
from kn_steer.tokens import prompt_ids


class RelationCorpus(BaseModel):
    """Labelled prompts: ``prompts[i]`` asks for relation ``relations[i]``."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1)
    relations: list[str]
    source: str = ""

    @classmethod
    def of(cls, items: Sequence[LabelledPrompt], source: str = "") -> "RelationCorpus":
        return cls(prompts=[i.prompt for i in items], relations=[i.relation for i in items], source=source)


class RelationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relation: str = Field(description="the relation whose neurons to find, e.g. P36")
    count: int = Field(100, ge=1, description="neurons in the set: the top N by average precision")
    value: float = Field(0.0, description="default operation: clamp to this value (deactivate)")
    facts_per_relation: int = Field(FACTS_PER_RELATION, ge=1, description="corpus: train facts per relation")
    prompts_per_fact: int = Field(PROMPTS_PER_FACT, ge=1, description="corpus: patterns per fact")
    batch_size: int = Field(32, ge=1, description="prompts per forward")


def train_items(method: str, path: Path, facts_per_relation: int, prompts_per_fact: int,
                limit: int | None = None) -> list[LabelledPrompt]:
    """The PARAREL train-split prompts a relation method reads (every relation with a usable pattern)."""
    if limit is not None:
        raise KnSteerError(f"--limit does not apply to the {method} method; "
                           "use --facts-per-relation / --prompts-per-fact")
    if not path.is_dir():
        raise DataError(f"{path}: the {method} method reads a PARAREL folder (patterns/ and facts/)")
    items = relation_prompts(load_pararel(path), "train", facts_per_relation, prompts_per_fact)
    if not items:
        raise DataError(f"{path}: no usable PARAREL prompts")
    return items


def load_corpus(path: Path, format: str, params: RelationParams, limit: int | None = None) -> RelationCorpus:
    """The training corpus of a PARAREL folder (every relation with a usable pattern)."""
    items = train_items("relation", path, params.facts_per_relation, params.prompts_per_fact, limit)
    return RelationCorpus.of(items, str(path))


def relation_scores(activations: torch.Tensor, labels: Sequence[str], relations: Sequence[str],
                    shape: ModelShape) -> dict[str, torch.Tensor]:
    """Per relation, every neuron's AP as ``[layers, units]``: one sort serves all relations."""
    aps = label_ap(activations, labels, relations)
    return {r: ap.reshape(shape.num_layers, shape.intermediate_size) for r, ap in aps.items()}


def accumulate(ctx: Context, corpus: RelationCorpus, params: RelationParams) -> CorpusStats:
    present = set(corpus.relations)
    if params.relation not in present:
        raise KnSteerError(f"relation {params.relation!r} has no prompts in {corpus.source or 'the corpus'} "
                           f"(have: {', '.join(sorted(present))})")
    if len(present) < 2:
        raise KnSteerError("the relation method needs prompts of at least two relations to contrast")
    shape = ModelShape.from_config(ctx.model.config)
    bar = None
    if ctx.progress:
        bar = tqdm(total=len(corpus.prompts), desc="relation activations", unit="prompt")
    step = bar.update if bar is not None else None
    if ctx.activations is not None:  # vLLM: read back at each prompt's last token
        rows = [prompt_ids(ctx.tokenizer, p) for p in corpus.prompts]
        acts = ctx.activations.last_token_activations(rows, progress=step)
    else:
        acts = last_token_activations(ctx.model, ctx.tokenizer, corpus.prompts, params.batch_size, progress=step)
    if bar is not None:
        bar.close()
    positives = sum(r == params.relation for r in corpus.relations)
    scores = relation_scores(acts, corpus.relations, [params.relation], shape)[params.relation]
    return CorpusStats(scores=scores, info={
        "prompts": len(corpus.prompts), "positives": positives, "relations": len(present),
        "prevalence": positives / len(corpus.prompts),
    })


def select(stats: CorpusStats, params: RelationParams) -> Selection:
    neurons = [Neuron(layer=l, index=i, score=s) for l, i, s in top_flat(stats.scores, params.count)]
    return Selection(
        neurons=neurons, operation=Operation(op="clamp", value=params.value),
        metrics={"relation": params.relation, **stats.info,
                 "ap_max": neurons[0].score if neurons else None,
                 "ap_min": neurons[-1].score if neurons else None},
    )


RELATION = CorpusMethod(
    name="relation", description="relation-specific neurons (average precision, Liu et al. 2024)",
    params_model=RelationParams, corpus_model=RelationCorpus, load_corpus=load_corpus,
    accumulate=accumulate, select=select, formats=("pararel",), backends=("hf", "vllm"),
)
