"""``kn``: knowledge neurons (Dai et al. 2022), a per-example method.

Per prompt, integrated gradients of every neuron (zero baseline); coarse selection keeps neurons
scoring above ``threshold * max``; refinement keeps neurons found in more than a fraction ``p`` of
the fact's paraphrases, scored by their mean attribution over the fact's prompts. Many facts in
one file: the set is the union of the facts' neurons that occur in more than a fraction
``fact_fraction`` of facts (0: union), ranked by number of facts then mean score, optionally
capped at ``max_neurons``. The per-fact neurons stay in ``OUT.examples.jsonl``. Default
operation: ``scale`` by ``factor`` (0.0: suppression, Dai et al.'s erasing experiment).

Example (one JSONL line)::

    {"id": "P36-Paris", "prompts": ["The capital of France is", "France's capital city is"], "target": " Paris"}
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kn_steer.data.pararel import Relation
from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.examples import Example
from kn_steer.localize.methods.base import (
    Context,
    ExampleMethod,
    ExampleResult,
    ScoredNeuron,
    Selection,
)
from kn_steer.sets.format import Neuron, Operation


class KNExample(Example):
    """One fact: paraphrased prompts that should all be completed by ``target``."""

    prompts: list[str] = Field(min_length=1)

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, prompts: list[str]) -> list[str]:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return prompts


class AttributionParams(BaseModel):
    """Integrated-gradients options shared by the attribution methods."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(20, ge=1, description="integrated-gradients steps m")
    target_mode: Literal["first", "sum"] = Field(
        "first", description="first target token, or the sum over target tokens")
    first_order: bool = Field(False, description="gradient x activation in one pass (an approximation)")


class KNParams(AttributionParams):
    threshold: float = Field(0.2, gt=0, le=1, description="coarse selection: score > t x max")
    p: float = Field(0.5, ge=0, lt=1, description="keep neurons found in > p of a fact's prompts")
    fact_fraction: float = Field(0.0, ge=0, lt=1, description="keep neurons of > this fraction of facts (0: union)")
    max_neurons: int | None = Field(None, ge=1, description="cap the set size")
    factor: float = Field(0.0, description="default operation: scale by this factor")


def coarse_select(scores: torch.Tensor, threshold: float) -> list[ScoredNeuron]:
    """Dai et al.'s adaptive threshold: neurons scoring above ``threshold * max`` (max > 0)."""
    top = float(scores.max())
    if top <= 0:
        return []
    width = scores.shape[1]
    flat = (scores.flatten() > threshold * top).nonzero().flatten()
    values = scores.flatten()[flat]
    return [ScoredNeuron(layer=int(f) // width, index=int(f) % width, score=float(v))
            for f, v in zip(flat.tolist(), values.tolist())]


def score(ctx: Context, example: KNExample, params: KNParams) -> ExampleResult:
    target = encode_target(ctx.tokenizer, example.target)
    found: dict[tuple[int, int], list[float]] = defaultdict(list)
    objectives = []
    for prompt in example.prompts:
        result = attribute_ids(
            ctx.model, encode_prompt(ctx.tokenizer, prompt), target, steps=params.steps,
            target_mode=params.target_mode, first_order=params.first_order, step_chunk=ctx.step_chunk,
        )
        objectives.append(result.objective)
        for n in coarse_select(result.scores, params.threshold):
            found[(n.layer, n.index)].append(n.score)
    n_prompts = len(example.prompts)
    kept = [
        ScoredNeuron(layer=l, index=i, score=sum(s) / len(s))
        for (l, i), s in found.items() if len(s) / n_prompts > params.p
    ]
    kept.sort(key=lambda n: -n.score)
    return ExampleResult(neurons=kept, info={
        "prompts": n_prompts, "coarse": len(found), "objective": objectives,
    })


def select(results: list[ExampleResult], params: KNParams) -> Selection:
    facts: dict[tuple[int, int], list[float]] = defaultdict(list)
    for result in results:
        for n in result.neurons:
            facts[(n.layer, n.index)].append(n.score)
    total = max(len(results), 1)
    ranked = sorted(
        ((key, scores) for key, scores in facts.items() if len(scores) / total > params.fact_fraction),
        key=lambda item: (-len(item[1]), -sum(item[1]) / len(item[1])),
    )
    if params.max_neurons is not None:
        ranked = ranked[: params.max_neurons]
    neurons = [Neuron(layer=l, index=i, score=sum(s) / len(s)) for (l, i), s in ranked]
    return Selection(
        neurons=neurons, operation=Operation(op="scale", factor=params.factor),
        metrics={"facts": len(results), "facts_with_neurons": sum(1 for r in results if r.neurons),
                 "neurons_per_fact": [len(r.neurons) for r in results][:1000]},
    )


def fact_examples(relations: Mapping[str, Relation], wanted: Sequence[str], paraphrases: int,
                  per_relation: int) -> list[KNExample]:
    """Knowledge-neuron examples from PARAREL facts: up to ``per_relation`` facts per relation in
    a stable hashed order, each with ``paraphrases`` prompts taken cyclically from the usable
    patterns (so every pattern appears)."""
    out = []
    for rid in wanted:
        relation = relations[rid]
        facts = sorted(relation.facts,
                       key=lambda f: hashlib.sha256(f"kn:{rid}:{f.uuid or f.subject}".encode()).digest())
        prefixes = relation.prefixes
        for k, fact in enumerate(facts[:per_relation]):
            prompts = relation.prompts_for(fact)
            n = min(paraphrases, len(prefixes))
            out.append(KNExample(id=prompts.key, prompts=[prompts.prompts[(k + j) % len(prefixes)] for j in range(n)],
                                 target=prompts.target, meta={"relation": rid, "subject": fact.subject}))
    return out


KN = ExampleMethod(
    name="kn", description="knowledge neurons (Dai et al. 2022)", params_model=KNParams,
    example_model=KNExample, score=score, select=select,
    checkpoint_params=("steps", "target_mode", "first_order", "threshold", "p"),
)
