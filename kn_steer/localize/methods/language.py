"""``language``: language-specific neurons by activation-probability entropy (LAPE), a corpus method.

Tang et al. (2024) count, per language, how often each neuron fires over that language's text
(its *activation probability*), normalise the probabilities over languages into a distribution
and take its entropy: a neuron that fires for one language only has low entropy. The set is the
lowest-entropy ``entropy_fraction`` of all neurons among those whose probability in some language
exceeds the ``filter_quantile`` quantile of all probabilities; a selected neuron belongs to every
language whose probability exceeds that same bar (related languages can share one). Deactivating
a language's neurons should raise perplexity on that language far more than on the others
(measured by :mod:`kn_steer.eval.protocols.language`).

"Fires" is defined per family by :func:`kn_steer.models.sites.hook_firing` (gate open for gated
MLPs). The corpus is the train split of a parallel folder (``../shared/data/pud``): the first
``train`` aligned sentences in each language, so the held-out sentences are unseen in every
language. Special tokens (``<bos>``) are not counted: they are the same in every language.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.parallel import load_parallel
from kn_steer.errors import KnSteerError
from kn_steer.localize.firing import firing_counts
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.sets.format import Neuron, Operation


class LanguageCorpus(BaseModel):
    """Texts labelled by language: ``prompts[i]`` is in ``languages[i]``."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1)
    languages: list[str]
    source: str = ""


class LanguageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    language: str = Field(description="the language whose neurons form the set, e.g. fr")
    languages: str = Field("all", description="languages compared: comma-separated codes, or all in the folder")
    train: int = Field(500, ge=1, description="corpus: the first N aligned sentences (the rest is held out)")
    max_tokens: int = Field(64, ge=1, description="tokens read per sentence")
    filter_quantile: float = Field(0.95, gt=0, lt=1, description="activation-probability bar, as a quantile of all")
    entropy_fraction: float = Field(0.01, gt=0, le=1, description="share of all neurons kept, lowest entropy first")
    value: float = Field(0.0, description="default operation: clamp to this value (0: deactivate)")
    batch_size: int = Field(16, ge=1, description="sentences per forward")

    def language_list(self) -> list[str] | None:
        return None if self.languages.strip() == "all" else [c.strip() for c in self.languages.split(",") if c.strip()]


def load_corpus(path: Path, format: str, params: LanguageParams, limit: int | None = None) -> LanguageCorpus:
    """The train split of a parallel folder, every compared language."""
    if limit is not None:
        raise KnSteerError("--limit does not apply to the language method; use --train")
    text = load_parallel(path, params.language_list()).split(params.train, "train")
    if params.language not in text.languages:
        raise KnSteerError(f"--language {params.language}: not among the compared languages "
                           f"({', '.join(text.languages)})")
    if len(text.languages) < 2:
        raise KnSteerError("the language method needs at least two languages to contrast")
    prompts = [t for lang in text.languages for t in text.texts[lang]]
    labels = [lang for lang in text.languages for _ in text.texts[lang]]
    return LanguageCorpus(prompts=prompts, languages=labels, source=str(path))


def activation_probabilities(ctx: Context, corpus: LanguageCorpus, params: LanguageParams
                             ) -> tuple[list[str], torch.Tensor, dict[str, int]]:
    """Languages in corpus order, ``[languages, layers, units]`` firing probabilities, tokens per language."""
    languages = list(dict.fromkeys(corpus.languages))
    bar = tqdm(total=len(corpus.prompts), desc="language activations", unit="text", disable=not ctx.progress)
    probs, tokens = [], {}
    try:
        for lang in languages:
            texts = [t for t, l in zip(corpus.prompts, corpus.languages) if l == lang]
            counts, n = firing_counts(ctx.model, ctx.tokenizer, texts, params.max_tokens, params.batch_size, bar.update)
            if n == 0:
                raise KnSteerError(f"language {lang!r}: no tokens to count")
            probs.append(counts.double() / n)
            tokens[lang] = n
    finally:
        bar.close()
    return languages, torch.stack(probs), tokens


def lape_sets(probs: torch.Tensor, languages: Sequence[str], filter_quantile: float = 0.95,
              entropy_fraction: float = 0.01) -> tuple[dict[str, list[tuple[int, int, float]]], dict[str, Any]]:
    """Per language, its neurons ``(layer, index, probability)`` (most probable first), and the
    selection's numbers. ``probs``: ``[languages, layers, units]``."""
    n_lang, layers, units = probs.shape
    flat = probs.reshape(n_lang, -1)
    bar = float(torch.quantile(flat.flatten().float(), filter_quantile))
    share = flat / flat.sum(0, keepdim=True).clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(0)
    eligible = (flat > bar).any(0)
    keep = max(1, round(entropy_fraction * flat.shape[1]))
    ranked = torch.where(eligible, entropy, torch.full_like(entropy, float("inf")))
    chosen = torch.topk(ranked, min(keep, int(eligible.sum())), largest=False).indices
    sets: dict[str, list[tuple[int, int, float]]] = {}
    for li, lang in enumerate(languages):
        members = [int(j) for j in chosen if float(flat[li, j]) > bar]
        members.sort(key=lambda j: -float(flat[li, j]))
        sets[lang] = [(j // units, j % units, round(float(flat[li, j]), 6)) for j in members]
    info = {"probability_bar": round(bar, 6), "selected": int(chosen.numel()), "eligible": int(eligible.sum()),
            "entropy_max_selected": round(float(entropy[chosen].max()), 6) if chosen.numel() else None}
    return sets, info


def accumulate(ctx: Context, corpus: LanguageCorpus, params: LanguageParams) -> CorpusStats:
    languages, probs, tokens = activation_probabilities(ctx, corpus, params)
    target = languages.index(params.language)
    return CorpusStats(scores=probs[target].float(), info={"languages": languages, "probs": probs, "tokens": tokens})


def select(stats: CorpusStats, params: LanguageParams) -> Selection:
    languages, probs = stats.info["languages"], stats.info["probs"]
    sets, info = lape_sets(probs, languages, params.filter_quantile, params.entropy_fraction)
    mine = sets[params.language]
    if not mine:
        raise KnSteerError(f"no language-specific neuron for {params.language!r} "
                           f"({info['selected']} selected across {len(languages)} languages); "
                           "raise --entropy-fraction or lower --filter-quantile")
    layers: dict[int, int] = {}
    for layer, _, _ in mine:
        layers[layer] = layers.get(layer, 0) + 1
    return Selection(
        neurons=[Neuron(layer=l, index=i, score=p) for l, i, p in mine],
        operation=Operation(op="clamp", value=params.value),
        metrics={"language": params.language, "languages": languages, "tokens": stats.info["tokens"], **info,
                 "per_language": {lang: len(s) for lang, s in sets.items()},
                 "layers": {str(k): v for k, v in sorted(layers.items())}},
    )


LANGUAGE = CorpusMethod(
    name="language", description="language-specific neurons (activation-probability entropy, LAPE, Tang et al. 2024)",
    params_model=LanguageParams, corpus_model=LanguageCorpus, load_corpus=load_corpus,
    accumulate=accumulate, select=select, formats=("parallel",),
)
