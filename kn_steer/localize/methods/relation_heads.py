"""``relation-heads``: attention heads that carry a relation, by ablation effect (a corpus method).

"Does knowledge localization hold true? ... entity and relation perspectives" finds relational
knowledge stored in attention modules as well as in MLP weights. This method locates a relation's
heads causally: each head's output (its slice of the input of ``o_proj``, the ``attn.heads`` site
the serving path steers) is zeroed at every position, one head at a time, and the relative drop of
P(answer's first token) is measured over up to ``max_prompts`` prompts of the relation that the
model answers right, and over as many right-answered prompts of the other relations. A head's
score is its mean drop on the relation minus its mean drop on the others, so a head every fact
needs (a previous-token head) is not counted as the relation's. The top ``count`` heads form a
version-2 set; default operation scale x0.

The corpus is the PARAREL train split, as for ``relation`` (its facts carry their answers).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.pararel import FACTS_PER_RELATION, PROMPTS_PER_FACT
from kn_steer.errors import KnSteerError
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.localize.methods.relation import train_items
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import Head, Operation
from kn_steer.steering.compile import CompiledSteering, compile_spec


class FactCorpus(BaseModel):
    """Labelled prompts with their answers: ``prompts[i]`` asks for ``relations[i]``, answered by ``targets[i]``."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    targets: list[str]
    relations: list[str]
    source: str = ""


class RelationHeadsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relation: str = Field(description="the relation whose heads to find, e.g. P36")
    count: int = Field(5, ge=1, description="heads in the set: the top N by specific ablation effect")
    max_prompts: int = Field(48, ge=1, description="right-answered prompts of the relation (and of the others) per head")
    layers: list[int] | None = Field(None, description="search the heads of these layers only (None: every layer)")
    known_only: bool = Field(True, description="measure on prompts the model answers right (False: on any prompt)")
    factor: float = Field(0.0, description="default operation: scale by this factor")
    facts_per_relation: int = Field(FACTS_PER_RELATION, ge=1, description="corpus: train facts per relation")
    prompts_per_fact: int = Field(PROMPTS_PER_FACT, ge=1, description="corpus: patterns per fact")
    batch_size: int = Field(48, ge=1, description="prompts per forward")


def load_corpus(path: Path, format: str, params: RelationHeadsParams, limit: int | None = None) -> FactCorpus:
    """The training corpus of a PARAREL folder (every relation with a usable pattern), with answers."""
    items = train_items("relation-heads", path, params.facts_per_relation, params.prompts_per_fact, limit)
    return FactCorpus(prompts=[i.prompt for i in items], targets=[i.target for i in items],
                      relations=[i.relation for i in items], source=str(path))


def head_ablation(heads: Sequence[tuple[int, int]], shape: ModelShape, factor: float = 0.0) -> CompiledSteering:
    """The heads scaled by ``factor`` at every position (the serving path's head operation)."""
    spec = {"interventions": [{"heads": [list(h) for h in heads], "op": "scale", "factor": factor}]}
    return compile_spec(spec, {}, shape)


def known_prompts(ctx: Context, prompts: Sequence[str], targets: Sequence[str], limit: int,
                  batch_size: int, known_only: bool = True) -> tuple[list[int], torch.Tensor]:
    """The first ``limit`` prompts answered right (greedy first token; any with ``known_only``
    False), and their P(answer); prompts are scored a chunk at a time until enough are found."""
    right: list[int] = []
    probs: list[float] = []
    chunk = max(4 * limit, batch_size)
    for start in range(0, len(prompts), chunk):
        scores = score_prompts(ctx.model, ctx.tokenizer, prompts[start:start + chunk], targets[start:start + chunk],
                               batch_size=batch_size)
        for i in range(len(scores.prob)):
            if bool(scores.correct[i]) or not known_only:
                right.append(start + i)
                probs.append(float(scores.prob[i]))
        if len(right) >= limit:
            break
    return right[:limit], torch.tensor(probs[:limit])


def accumulate(ctx: Context, corpus: FactCorpus, params: RelationHeadsParams) -> CorpusStats:
    present = set(corpus.relations)
    if params.relation not in present:
        raise KnSteerError(f"relation {params.relation!r} has no prompts in {corpus.source or 'the corpus'} "
                           f"(have: {', '.join(sorted(present))})")
    if len(present) < 2:
        raise KnSteerError("the relation-heads method needs prompts of at least two relations to contrast")
    shape = ModelShape.from_config(ctx.model.config)
    if not shape.num_heads:
        raise KnSteerError("this model family does not declare its attention heads")
    layers = sorted(set(params.layers)) if params.layers is not None else list(range(shape.num_layers))
    bad = [layer for layer in layers if not 0 <= layer < shape.num_layers]
    if bad or not layers:
        raise KnSteerError(f"layers {bad or '[]'}: the model has layers 0..{shape.num_layers - 1}")
    own = [i for i, r in enumerate(corpus.relations) if r == params.relation]
    others = [i for i, r in enumerate(corpus.relations) if r != params.relation]
    random.Random(f"relation-heads:{params.relation}").shuffle(others)
    groups = {}
    for name, idx, limit in (("relation", own, params.max_prompts), ("others", others, None)):
        prompts = [corpus.prompts[i] for i in idx]
        targets = [corpus.targets[i] for i in idx]
        right, base = known_prompts(ctx, prompts, targets, limit or len(groups["relation"][0]), params.batch_size,
                                    params.known_only)
        if not right:
            raise KnSteerError(f"the model answers no {'prompt of ' + params.relation if name == 'relation' else 'other prompt'} "
                               f"right in {corpus.source or 'the corpus'}")
        groups[name] = ([prompts[i] for i in right], [targets[i] for i in right], base)
    drops = torch.zeros(2, shape.num_layers, shape.num_heads)
    bar = tqdm(total=len(layers) * shape.num_heads, desc="head ablations", unit="head", disable=not ctx.progress)
    for layer in layers:
        for head in range(shape.num_heads):
            compiled = head_ablation([(layer, head)], shape)
            for g, (prompts, targets, base) in enumerate(groups.values()):
                after = score_prompts(ctx.model, ctx.tokenizer, prompts, targets, compiled, params.batch_size).prob
                drops[g, layer, head] = float(((base - after) / base).mean())
            bar.update()
    bar.close()
    return CorpusStats(scores=drops[0] - drops[1], info={
        "prompts": len(groups["relation"][0]), "other_prompts": len(groups["others"][0]),
        "relations": len(present), "layers": layers,
        "drop_relation": drops[0].tolist(), "drop_others": drops[1].tolist(),
    })


def select(stats: CorpusStats, params: RelationHeadsParams) -> Selection:
    """The top ``count`` heads of the searched layers by score."""
    width = stats.scores.shape[1]
    searched = torch.zeros_like(stats.scores, dtype=torch.bool)
    searched[stats.info["layers"]] = True
    flat = stats.scores.flatten()
    order = [int(k) for k in torch.argsort(flat, descending=True, stable=True) if searched.flatten()[k]][: params.count]
    heads = [Head(layer=int(k) // width, head=int(k) % width, score=float(flat[k])) for k in order]
    info = {k: v for k, v in stats.info.items() if not k.startswith("drop_")}
    return Selection(neurons=[], heads=heads, operation=Operation(op="scale", factor=params.factor),
                     metrics={"relation": params.relation, **info,
                              "drop_relation_top": [stats.info["drop_relation"][h.layer][h.head] for h in heads],
                              "drop_others_top": [stats.info["drop_others"][h.layer][h.head] for h in heads]})


RELATION_HEADS = CorpusMethod(
    name="relation-heads", description="attention heads of a relation by specific ablation effect",
    params_model=RelationHeadsParams, corpus_model=FactCorpus, load_corpus=load_corpus,
    accumulate=accumulate, select=select, formats=("pararel",),
)

__all__ = ["FactCorpus", "RELATION_HEADS", "RelationHeadsParams", "accumulate", "head_ablation", "known_prompts",
           "select"]
