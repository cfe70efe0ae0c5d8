"""``kn-multilingual``: knowledge neurons of a fact asked in several languages, weighted by the
model's uncertainty (after MATRICE and AMIG's language-independent knowledge neurons).

MATRICE (Multilingual Integrated Gradients with Uncertainty Estimation) aggregates a fact's
attributions over its queries and languages with their uncertainty; its abstract gives no formula,
so ours is stated here. Per query q (one language's cloze), integrated gradients as in ``kn`` (zero
baseline), divided by the query's maximum (``a_q``), and the model's confidence ``c_q`` = P(answer's
first token | query). Weights ``w_q = c_q / n_lang(q)`` (``weighting="confidence"``; each language
weighs as its mean confidence, so an answer the model is unsure of in a language counts less;
``"uniform"``: one weight per language). A neuron's score is the weighted mean of ``a_q`` minus
``spread`` times their weighted standard deviation (attributions that disagree across languages
are uncertain); neurons above ``threshold`` are kept.

Language-agnostic neurons (AMIG) are the neurons in the coarse set (above ``threshold`` x max) of
every language of the fact; each result records them, and the per-language coarse sets, in
:class:`LanguageTable` (``OUT.examples.jsonl``).

Example (one JSONL line)::

    {"id": "P36:Q142", "queries": [{"lang": "en", "prompt": "The capital of France is", "target": " Paris"},
                                   {"lang": "de", "prompt": "Die Hauptstadt von Frankreich ist", "target": " Paris"}]}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kn_steer.data.mlama import DEFAULT_LANGUAGES, load_mlama
from kn_steer.errors import DataError
from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.examples import Example
from kn_steer.localize.methods.base import Context, ExampleMethod, ExampleResult, ScoredNeuron, Selection
from kn_steer.localize.methods.kn import AttributionParams, coarse_select
from kn_steer.localize.methods.kn import select as kn_select

Pair = tuple[int, int]


class LanguageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lang: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)


class MultilingualExample(Example):
    """One fact asked in several languages; ``target`` is the first query's (filled in)."""

    queries: list[LanguageQuery] = Field(min_length=1)
    target: str = ""

    @model_validator(mode="after")
    def _first_target(self) -> "MultilingualExample":
        if not self.target:
            self.target = self.queries[0].target
        return self

    @property
    def languages(self) -> list[str]:
        return list(dict.fromkeys(q.lang for q in self.queries))


class MultilingualParams(AttributionParams):
    threshold: float = Field(0.2, gt=0, le=1, description="keep neurons scoring > t (and, per query, the coarse "
                                                            "sets at t x max)")
    spread: float = Field(1.0, ge=0, description="score: weighted mean minus spread x weighted sd over the queries")
    weighting: Literal["confidence", "uniform"] = Field(
        "confidence", description="query weights: the model's P(answer) (shared out within a language), or equal")
    fact_fraction: float = Field(0.0, ge=0, lt=1, description="keep neurons of > this fraction of facts (0: union)")
    max_neurons: int | None = Field(None, ge=1, description="cap the set size")
    factor: float = Field(0.0, description="default operation: scale by this factor")


class LanguageTable(BaseModel):
    """One fact's attributions: ``neurons`` is the union of the queries' coarse sets,
    ``normalized[q][j]`` neuron j's attribution on query q over that query's maximum,
    ``confidence[q]`` P(answer | query q), ``langs[q]`` its language."""

    model_config = ConfigDict(extra="forbid")
    neurons: list[Pair]
    normalized: list[list[float]]
    confidence: list[float]
    langs: list[str]
    threshold: float

    def coarse(self, query: int) -> set[Pair]:
        return {n for n, v in zip(self.neurons, self.normalized[query]) if v > self.threshold}

    def queries_of(self, langs: Sequence[str]) -> list[int]:
        return [q for q, lang in enumerate(self.langs) if lang in langs]

    def language_coarse(self, lang: str) -> set[Pair]:
        """The neurons coarse on every query of ``lang``."""
        sets = [self.coarse(q) for q in self.queries_of([lang])]
        return set.intersection(*sets) if sets else set()

    def agnostic(self, langs: Sequence[str] | None = None) -> set[Pair]:
        """AMIG's language-independent neurons: coarse in every one of ``langs`` (default: all)."""
        langs = list(dict.fromkeys(self.langs)) if langs is None else list(langs)
        sets = [self.language_coarse(lang) for lang in langs]
        return set.intersection(*sets) if sets else set()


def query_weights(table: LanguageTable, queries: Sequence[int], weighting: str) -> list[float]:
    """Normalized weights of ``queries``: each language's share is its mean confidence (or equal)."""
    per_lang: dict[str, int] = {}
    for q in queries:
        per_lang[table.langs[q]] = per_lang.get(table.langs[q], 0) + 1
    raw = [(table.confidence[q] if weighting == "confidence" else 1.0) / per_lang[table.langs[q]] for q in queries]
    total = sum(raw)
    if total <= 0:  # the model gives every query ~0: fall back to equal weights
        raw = [1.0 / per_lang[table.langs[q]] for q in queries]
        total = sum(raw)
    return [r / total for r in raw]


def weighted_neurons(table: LanguageTable, queries: Sequence[int], spread: float, weighting: str) -> list[ScoredNeuron]:
    """This method's rule on the chosen queries (a neuron outside the table is coarse on none of
    them: each of its values is at most the threshold, so its weighted mean cannot pass)."""
    if not queries:
        return []
    weights = query_weights(table, queries, weighting)
    out = []
    for j, (layer, index) in enumerate(table.neurons):
        values = [table.normalized[q][j] for q in queries]
        mean = sum(w * v for w, v in zip(weights, values))
        sd = math.sqrt(sum(w * (v - mean) ** 2 for w, v in zip(weights, values)))
        score = mean - spread * sd
        if score > table.threshold:
            out.append(ScoredNeuron(layer=layer, index=index, score=score))
    out.sort(key=lambda n: -n.score)
    return out


def language_table(ctx: Context, example: MultilingualExample, params: MultilingualParams) -> LanguageTable:
    """Attribute every query of ``example``; keep the scores of the neurons any query selects."""
    scores: list[torch.Tensor] = []
    confidence: list[float] = []
    union: dict[Pair, None] = {}
    for query in example.queries:
        result = attribute_ids(ctx.model, encode_prompt(ctx.tokenizer, query.prompt),
                               encode_target(ctx.tokenizer, query.target), steps=params.steps,
                               target_mode=params.target_mode, first_order=params.first_order,
                               step_chunk=ctx.step_chunk)
        scores.append(result.scores)
        confidence.append(result.objective)
        for n in coarse_select(result.scores, params.threshold):
            union[(n.layer, n.index)] = None
    neurons = sorted(union)
    maxima = [float(s.max()) for s in scores]
    normalized = [[float(s[l, i]) / m if m > 0 else 0.0 for l, i in neurons] for s, m in zip(scores, maxima)]
    return LanguageTable(neurons=neurons, normalized=normalized, confidence=confidence,
                         langs=[q.lang for q in example.queries], threshold=params.threshold)


def score(ctx: Context, example: MultilingualExample, params: MultilingualParams) -> ExampleResult:
    table = language_table(ctx, example, params)
    kept = weighted_neurons(table, range(len(example.queries)), params.spread, params.weighting)
    return ExampleResult(neurons=kept, info={"languages": example.languages, "agnostic": len(table.agnostic()),
                                             "table": table.model_dump()})


def select(results: list[ExampleResult], params: MultilingualParams) -> Selection:
    """As ``kn``: the union over facts (or the neurons of more than ``fact_fraction`` of them)."""
    selection = kn_select(results, params)  # type: ignore[arg-type]
    selection.metrics["agnostic_per_fact"] = [r.info.get("agnostic", 0) for r in results][:1000]
    return selection


def table_of(result: ExampleResult) -> LanguageTable:
    return LanguageTable.model_validate(result.info["table"])


def mlama_examples(folder: Path, limit: int | None, languages: Sequence[str] = DEFAULT_LANGUAGES,
                   relations: Sequence[str] | None = None, min_languages: int = 2) -> list[MultilingualExample]:
    """Examples from an mLAMA folder: facts asked in at least ``min_languages`` of ``languages``."""
    wanted = relations if relations is not None else _relations_in(folder)
    data = load_mlama(folder, languages, wanted)
    out = []
    for fact in data.facts:
        if len(fact.queries) < min_languages:
            continue
        queries = [LanguageQuery(lang=q.lang, prompt=q.prompt, target=q.target)
                   for lang in languages if (q := fact.queries.get(lang)) is not None]
        out.append(MultilingualExample(id=fact.key, queries=queries, meta={"relation": fact.relation}))
        if limit is not None and len(out) >= limit:
            break
    return out


def _relations_in(folder: Path) -> list[str]:
    from kn_steer.fileio import read_jsonl

    return sorted({r["relation"] for _, r in read_jsonl(Path(folder) / "templates" / "en.jsonl")})


def _read_mlama(path: Path, limit: int | None) -> list[Any]:
    """``--format mlama``: every language of the folder (English first), facts asked in two or more."""
    langs = sorted((p.stem for p in (Path(path) / "templates").glob("*.jsonl")), key=lambda x: (x != "en", x))
    if not langs:
        raise DataError(f"{path}: not an mLAMA folder (no templates/LANG.jsonl)")
    return mlama_examples(path, limit, langs)


KN_MULTILINGUAL = ExampleMethod(
    name="kn-multilingual",
    description="knowledge neurons over languages, weighted by the model's uncertainty (after MATRICE, AMIG)",
    params_model=MultilingualParams, example_model=MultilingualExample, score=score, select=select,
    checkpoint_params=("steps", "target_mode", "first_order", "threshold", "spread", "weighting"),
    formats={"mlama": _read_mlama},
)

__all__ = ["KN_MULTILINGUAL", "LanguageQuery", "LanguageTable", "MultilingualExample", "MultilingualParams",
           "language_table", "mlama_examples", "query_weights", "table_of", "weighted_neurons"]
