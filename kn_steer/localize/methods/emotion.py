"""``emotion``: neurons whose activation tracks one human-rated attribute of emotion concepts, a
corpus method (after Li et al., "Language-specific representation of emotion-concept knowledge
causally supports emotion inference").

Li et al. prompt a model with each of 27 emotion concepts and find, for each of 14 attributes
(arousal, valence, facial expressions, appraisals), a distinct population of neurons whose
activations follow the attribute's human ratings across the emotions. Li et al. used learned soft
prompts on RoBERTa; a causal LM reads text prompts instead: every emotion name is put at the end of
each of :data:`TEMPLATES` ("She was overwhelmed by a feeling of joy"), and a neuron's response to
an emotion is its activation at the name's last token, averaged over the templates. Its score for
an attribute is the Pearson correlation, over the 27 emotions, between that response and the
attribute's ratings (``attribute_scores.csv``); the set is the ``fraction`` of all neurons with
the largest ``|r|``. With 27 emotions many neurons correlate by chance, so the selection also
reports how many neurons pass the same ``|r|`` bar when the ratings are shuffled over the
emotions (``permutations`` draws): the share of the set chance alone would give.

GoEmotions is never read here: emotion inference under deactivation of these sets is measured
by :mod:`kn_steer.eval.protocols.emotion`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.emotion import load_attributes
from kn_steer.errors import KnSteerError
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.localize.recorder import last_token_activations
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import Neuron, Operation

#: Sentences that end with an emotion's name (``{}``), read at the name's last token.
TEMPLATES = (
    "The emotion I felt was {}",
    "She was overwhelmed by a feeling of {}",
    "His face showed clear signs of {}",
    "In that moment, all they could feel was {}",
    "The word that best describes my mood today is {}",
    "This is a story about {}",
    "He tried hard to hide his {}",
    "Everyone in the room could sense her {}",
)


class EmotionCorpus(BaseModel):
    """One prompt per (emotion, template), and the rating table."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    emotion_of_prompt: list[int]
    emotions: list[str]
    attributes: list[str]
    ratings: list[list[float]]  # [emotions][attributes]
    source: str = ""


class EmotionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attribute: str = Field(description="the rated attribute whose neurons form the set, e.g. valence")
    fraction: float = Field(0.005, gt=0, le=1, description="share of all neurons kept, largest |r| first")
    permutations: int = Field(20, ge=0, description="shuffles of the ratings for the chance count")
    value: float = Field(0.0, description="default operation: clamp to this value (0: deactivate)")
    batch_size: int = Field(27, ge=1, description="prompts per forward")


def load_corpus(path: Path, format: str, params: EmotionParams, limit: int | None = None) -> EmotionCorpus:
    if limit is not None:
        raise KnSteerError("--limit does not apply to the emotion method: it reads every rated emotion")
    table = load_attributes(path)
    table.column(params.attribute)  # an unknown attribute fails here, before any model work
    prompts, owner = [], []
    for e, name in enumerate(table.emotions):
        for template in TEMPLATES:
            prompts.append(template.format(name))
            owner.append(e)
    return EmotionCorpus(prompts=prompts, emotion_of_prompt=owner, emotions=table.emotions,
                         attributes=table.attributes, ratings=table.scores.tolist(), source=str(path))


def emotion_responses(ctx: Context, corpus: EmotionCorpus, batch_size: int = 27) -> torch.Tensor:
    """``[emotions, layers * units]``: each neuron's activation at the emotion name's last token,
    averaged over the templates."""
    bar = tqdm(total=len(corpus.prompts), desc="emotion prompts", unit="prompt", disable=not ctx.progress)
    try:
        acts = last_token_activations(ctx.model, ctx.tokenizer, corpus.prompts, batch_size, progress=bar.update)
    finally:
        bar.close()
    owner = torch.tensor(corpus.emotion_of_prompt)
    sums = torch.zeros(len(corpus.emotions), acts.shape[1], dtype=torch.float64).index_add_(0, owner, acts.double())
    return sums / torch.bincount(owner, minlength=len(corpus.emotions)).clamp_min(1)[:, None]


def correlations(responses: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Pearson ``r`` of every neuron's response with every rating column: ``[attributes, neurons]``
    (0 where a neuron's response does not vary)."""
    x = responses - responses.mean(0, keepdim=True)
    y = ratings - ratings.mean(0, keepdim=True)
    cov = y.T @ x
    norm = y.norm(dim=0)[:, None] * x.norm(dim=0)[None, :]
    return torch.where(norm > 0, cov / norm.clamp_min(1e-300), torch.zeros_like(cov))


def chance_counts(responses: torch.Tensor, rating: torch.Tensor, bar: float, permutations: int,
                  seed: int = 0) -> list[int]:
    """Per shuffle of ``rating`` over the emotions, the neurons whose ``|r|`` reaches ``bar``."""
    generator = torch.Generator().manual_seed(seed)
    counts = []
    for _ in range(permutations):
        shuffled = rating[torch.randperm(rating.numel(), generator=generator)]
        counts.append(int((correlations(responses, shuffled[:, None])[0].abs() >= bar).sum()))
    return counts


def accumulate(ctx: Context, corpus: EmotionCorpus, params: EmotionParams) -> CorpusStats:
    return all_attribute_stats(ctx, corpus, params)[params.attribute]


def select(stats: CorpusStats, params: EmotionParams) -> Selection:
    scores, r = stats.scores, stats.info["r"]
    keep = max(1, round(params.fraction * scores.numel()))
    top = torch.topk(scores.flatten(), keep).indices
    units = scores.shape[1]
    bar = float(scores.flatten()[top].min())
    chance = chance_counts(stats.info["responses"], stats.info["rating"], bar, params.permutations)
    neurons = [Neuron(layer=int(j) // units, index=int(j) % units, score=round(float(r.flatten()[j]), 6))
               for j in top]
    layers: dict[int, int] = {}
    for n in neurons:
        layers[n.layer] = layers.get(n.layer, 0) + 1
    return Selection(
        neurons=neurons,
        operation=Operation(op="clamp", value=params.value),
        metrics={"attribute": params.attribute, "emotions": stats.info["emotions"],
                 "prompts": stats.info["prompts"], "abs_r_bar": round(bar, 6),
                 "positive": sum(n.score > 0 for n in neurons), "negative": sum(n.score < 0 for n in neurons),
                 "chance_above_bar_mean": sum(chance) / len(chance) if chance else None,
                 "chance_above_bar": chance, "layers": {str(k): v for k, v in sorted(layers.items())}},
    )


EMOTION = CorpusMethod(
    name="emotion", description="neurons tracking a rated attribute of emotion concepts (Li et al.)",
    params_model=EmotionParams, corpus_model=EmotionCorpus, load_corpus=load_corpus,
    accumulate=accumulate, select=select, formats=("emotion",),
)


def all_attribute_stats(ctx: Context, corpus: EmotionCorpus, params: EmotionParams) -> dict[str, CorpusStats]:
    """Every attribute's statistics from one pass over the prompts (``accumulate`` keeps the one
    of ``params.attribute``; the evaluation driver builds all fourteen sets from one pass)."""
    responses = emotion_responses(ctx, corpus, params.batch_size)
    ratings = torch.tensor(corpus.ratings, dtype=torch.float64)
    r = correlations(responses, ratings)
    layers = ModelShape.from_config(ctx.model.config).num_layers
    return {name: CorpusStats(scores=r[a].abs().float().reshape(layers, -1),
                              info={"r": r[a].float().reshape(layers, -1), "responses": responses,
                                    "rating": ratings[:, a], "emotions": len(corpus.emotions),
                                    "prompts": len(corpus.prompts)})
            for a, name in enumerate(corpus.attributes)}


__all__ = ["EMOTION", "EmotionCorpus", "EmotionParams", "TEMPLATES", "all_attribute_stats", "correlations"]
