"""Localization methods behind one small registry, so new methods plug in by name.

A method is a :class:`MethodSpec`: a name, a pydantic parameter model, the example model it reads
(with a JSONL loader), ``score_example`` (one example -> scored neurons, stored in the resumable
checkpoint) and ``select`` (all per-example results -> the final neurons and default operation).
``checkpoint_params`` names the parameters that change per-example results: only those key the
checkpoint, so re-selecting with another ``count`` or ``factor`` reuses finished examples.

Built in:

* ``kn`` (Dai et al. 2022, knowledge neurons): per prompt, integrated gradients of every neuron
  (zero baseline); coarse selection keeps neurons scoring above ``threshold * max``; refinement
  keeps neurons found in more than a fraction ``p`` of the fact's paraphrases, scored by their mean
  attribution over the fact's prompts. Many facts in one file: the set is the union of the facts'
  neurons that occur in more than a fraction ``fact_fraction`` of facts (0: union), ranked by
  number of facts then mean score, optionally capped at ``max_neurons``. The per-fact neurons stay
  in ``OUT.examples.jsonl`` (see :mod:`kn_steer.localize.runner`). Default operation: ``scale``
  by ``factor`` (0.0: suppression, Dai et al.'s erasing experiment; 2.0 amplifies).
* ``ircan`` (context-aware neurons): per example, the ``top_k`` neurons by integrated gradients
  along the path from the context-free activation to the activation with context, for the
  context-faithful target; the set is the ``count`` neurons found in most examples (ties by summed
  score). Default operation: ``scale`` by ``factor`` (IRCAN's enhancement beta, default 2.0).

Both accept ``first_order`` (gradient x activation difference in one pass: an approximation, see
:mod:`kn_steer.localize`) and ``target_mode`` (``first`` token or ``sum`` over target tokens).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kn_steer.errors import KnSteerError
from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.examples import IRCANExample, KNExample, load_examples
from kn_steer.sets.format import Neuron, Operation


class ScoredNeuron(BaseModel):
    """A neuron and its score, as stored per example in checkpoints."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    index: int
    score: float


class ExampleResult(BaseModel):
    """What one example contributes: its scored neurons and free-form diagnostics."""

    model_config = ConfigDict(extra="forbid")
    neurons: list[ScoredNeuron]
    info: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Selection:
    """The final set: neurons (with scores), the default operation and metrics for the file."""

    neurons: list[Neuron]
    operation: Operation
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a method needs to score an example."""

    model: Any
    tokenizer: Any
    step_chunk: int | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    params_model: type[BaseModel]
    example_model: type[BaseModel]
    score_example: Callable[[Context, Any, Any], ExampleResult]
    select: Callable[[list[ExampleResult], Any], Selection]
    checkpoint_params: tuple[str, ...]

    def load_examples(self, path: str | Path, limit: int | None = None) -> list[Any]:
        return load_examples(path, self.example_model, limit)  # type: ignore[type-var]

    def parse_params(self, values: dict[str, Any]) -> BaseModel:
        from pydantic import ValidationError

        try:
            return self.params_model.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise KnSteerError(f"invalid parameters for method {self.name!r}:\n{exc}") from exc


_METHODS: dict[str, MethodSpec] = {}

# Modules that register further methods when imported (a module not written yet is skipped).
# A new method: write a module that calls ``register_method(MethodSpec(...))`` and list it here.
METHOD_MODULES: tuple[str, ...] = (
    "kn_steer.localize.stats",
    "kn_steer.localize.relation",
    "kn_steer.localize.language",
)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib

    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method (a later registration under the same name replaces the earlier one)."""
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_plugins()
    try:
        return _METHODS[name]
    except KeyError:
        raise KnSteerError(
            f"unknown localization method {name!r}; available: {', '.join(sorted(_METHODS))}"
        ) from None


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(_METHODS)


# ------------------------------------------------------------------------------ shared params


class AttributionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(20, ge=1, description="integrated-gradients steps m")
    target_mode: Literal["first", "sum"] = "first"
    first_order: bool = Field(False, description="gradient x activation approximation")


def _top(scores: torch.Tensor, k: int) -> list[ScoredNeuron]:
    width = scores.shape[1]
    values, flat = scores.flatten().topk(min(k, scores.numel()))
    return [ScoredNeuron(layer=int(f) // width, index=int(f) % width, score=float(v))
            for v, f in zip(values.tolist(), flat.tolist())]


# ------------------------------------------------------------------------------------- kn


class KNParams(AttributionParams):
    threshold: float = Field(0.2, gt=0, le=1, description="coarse selection: score > t * max")
    p: float = Field(0.5, ge=0, lt=1, description="keep neurons found in > p of the prompts")
    fact_fraction: float = Field(0.0, ge=0, lt=1, description="keep neurons of > this fraction of facts")
    max_neurons: int | None = Field(None, ge=1)
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


def kn_score_example(ctx: Context, example: KNExample, params: KNParams) -> ExampleResult:
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


def kn_select(results: list[ExampleResult], params: KNParams) -> Selection:
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


# ---------------------------------------------------------------------------------- ircan


class IRCANParams(AttributionParams):
    top_k: int = Field(20, ge=1, description="neurons kept per example")
    count: int = Field(14, ge=1, description="neurons in the set: the most frequent across examples")
    factor: float = Field(2.0, description="default operation: scale (enhance) by this factor")


def ircan_score_example(ctx: Context, example: IRCANExample, params: IRCANParams) -> ExampleResult:
    result = attribute_ids(
        ctx.model, encode_prompt(ctx.tokenizer, example.full_prompt),
        encode_target(ctx.tokenizer, example.target),
        baseline_ids=encode_prompt(ctx.tokenizer, example.prompt), steps=params.steps,
        target_mode=params.target_mode, first_order=params.first_order, step_chunk=ctx.step_chunk,
    )
    return ExampleResult(neurons=_top(result.scores, params.top_k), info={"objective": result.objective})


def ircan_select(results: list[ExampleResult], params: IRCANParams) -> Selection:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    sums: dict[tuple[int, int], float] = defaultdict(float)
    for result in results:
        for n in result.neurons:
            counts[(n.layer, n.index)] += 1
            sums[(n.layer, n.index)] += n.score
    ranked = sorted(counts, key=lambda key: (-counts[key], -sums[key]))[: params.count]
    neurons = [Neuron(layer=l, index=i, score=sums[(l, i)] / counts[(l, i)]) for l, i in ranked]
    return Selection(
        neurons=neurons, operation=Operation(op="scale", factor=params.factor),
        metrics={"examples": len(results), "frequency": [counts[key] for key in ranked]},
    )


register_method(MethodSpec(
    name="kn", description="knowledge neurons (Dai et al. 2022)", params_model=KNParams,
    example_model=KNExample, score_example=kn_score_example, select=kn_select,
    checkpoint_params=("steps", "target_mode", "first_order", "threshold", "p"),
))
register_method(MethodSpec(
    name="ircan", description="IRCAN context-aware neurons", params_model=IRCANParams,
    example_model=IRCANExample, score_example=ircan_score_example, select=ircan_select,
    checkpoint_params=("steps", "target_mode", "first_order", "top_k"),
))
