"""``kn-consistent``: consistency-aware knowledge neurons, after Chen et al.'s query localization.

Chen et al. ("Knowledge localization: mission not accomplished? Enter query localization!") find
that a fact's knowledge neurons follow the query (the paraphrase) more than the fact, and select
neurons with the queries' agreement in mind. Their abstract gives no formula, so ours is stated
here: per query, integrated gradients as in ``kn`` (zero baseline), divided by the query's maximum
so that queries weigh alike; a neuron's score is the mean of these normalized attributions over the
fact's queries minus ``spread`` times their standard deviation; neurons scoring above ``threshold``
are kept. With ``spread`` 0 this is a mean-attribution rule; larger values demand agreement.

The per-example result keeps every query's attribution table (:class:`QueryTable`), so the plain
Dai et al. rule and this one can be applied to any subset of the queries afterwards (the query
localization protocol localizes on some paraphrases and measures on others).
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.methods.base import Context, ExampleMethod, ExampleResult, ScoredNeuron, Selection
from kn_steer.localize.methods.kn import AttributionParams, KNExample, coarse_select
from kn_steer.localize.methods.kn import select as kn_select

Pair = tuple[int, int]


class KNConsistentParams(AttributionParams):
    threshold: float = Field(0.2, gt=0, le=1, description="keep neurons whose consistency score > t (and, per "
                                                            "query, the coarse sets at t x max)")
    spread: float = Field(1.0, ge=0, description="consistency score: mean minus spread x sd of the normalized "
                                                  "attributions over the queries")
    fact_fraction: float = Field(0.0, ge=0, lt=1, description="keep neurons of > this fraction of facts (0: union)")
    max_neurons: int | None = Field(None, ge=1, description="cap the set size")
    factor: float = Field(0.0, description="default operation: scale by this factor")


class QueryTable(BaseModel):
    """One fact's attributions: ``neurons`` is the union of the queries' coarse sets (score above
    ``threshold`` x the query's max), ``normalized[q][j]`` the attribution of neuron j on query q
    divided by query q's max (which is ``maxima[q]``)."""

    model_config = ConfigDict(extra="forbid")
    neurons: list[Pair]
    normalized: list[list[float]]
    maxima: list[float]
    threshold: float

    def coarse(self, query: int) -> set[Pair]:
        return {n for n, v in zip(self.neurons, self.normalized[query]) if v > self.threshold}


def query_table(ctx: Context, example: KNExample, params: KNConsistentParams) -> QueryTable:
    """Attribute every query of ``example`` and keep the scores of the neurons any query selects."""
    target = encode_target(ctx.tokenizer, example.target)
    scores: list[torch.Tensor] = []
    union: dict[Pair, None] = {}
    for prompt in example.prompts:
        result = attribute_ids(ctx.model, encode_prompt(ctx.tokenizer, prompt), target, steps=params.steps,
                               target_mode=params.target_mode, first_order=params.first_order,
                               step_chunk=ctx.step_chunk)
        scores.append(result.scores)
        for n in coarse_select(result.scores, params.threshold):
            union[(n.layer, n.index)] = None
    neurons = sorted(union)
    maxima = [float(s.max()) for s in scores]
    normalized = [[float(s[l, i]) / m if m > 0 else 0.0 for l, i in neurons] for s, m in zip(scores, maxima)]
    return QueryTable(neurons=neurons, normalized=normalized, maxima=maxima, threshold=params.threshold)


def consistent_neurons(table: QueryTable, queries: Sequence[int], spread: float) -> list[ScoredNeuron]:
    """This method's rule on the chosen queries: mean - spread x sd of the normalized attributions
    above the table's threshold (a neuron outside the table is coarse on no query: it scores at most
    the threshold on each, so its mean cannot pass)."""
    threshold = table.threshold
    out = []
    for j, (layer, index) in enumerate(table.neurons):
        values = [table.normalized[q][j] for q in queries]
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        score = statistics.mean(values) - spread * sd
        if score > threshold:
            out.append(ScoredNeuron(layer=layer, index=index, score=score))
    out.sort(key=lambda n: -n.score)
    return out


def shared_neurons(table: QueryTable, queries: Sequence[int], p: float) -> list[ScoredNeuron]:
    """Dai et al.'s rule on the chosen queries (as ``kn``): coarse on more than a fraction ``p`` of
    them, scored by the mean normalized attribution where coarse."""
    out = []
    for j, (layer, index) in enumerate(table.neurons):
        hits = [table.normalized[q][j] for q in queries if table.normalized[q][j] > table.threshold]
        if hits and len(hits) / len(queries) > p:
            out.append(ScoredNeuron(layer=layer, index=index, score=statistics.mean(hits)))
    out.sort(key=lambda n: -n.score)
    return out


def score(ctx: Context, example: KNExample, params: KNConsistentParams) -> ExampleResult:
    table = query_table(ctx, example, params)
    kept = consistent_neurons(table, range(len(example.prompts)), params.spread)
    return ExampleResult(neurons=kept, info={"prompts": len(example.prompts), "table": table.model_dump()})


def select(results: list[ExampleResult], params: KNConsistentParams) -> Selection:
    """As ``kn``: the union over facts (or the neurons of more than ``fact_fraction`` of them)."""
    return kn_select(results, params)  # type: ignore[arg-type]


def table_of(result: ExampleResult) -> QueryTable:
    return QueryTable.model_validate(result.info["table"])


KN_CONSISTENT = ExampleMethod(
    name="kn-consistent", description="consistency-aware knowledge neurons (after Chen et al., query localization)",
    params_model=KNConsistentParams, example_model=KNExample, score=score, select=select,
    checkpoint_params=("steps", "target_mode", "first_order", "threshold", "spread"),
)

__all__ = ["KNConsistentParams", "KN_CONSISTENT", "QueryTable", "consistent_neurons", "query_table",
           "shared_neurons", "table_of"]
