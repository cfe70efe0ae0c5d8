"""``ircan``: IRCAN's context-aware neurons (Shi et al. 2024), a per-example method.

Per example, integrated gradients along the path from the activations of the context-free prompt
to the activations with the context, for the context-faithful target; the example keeps its
``top_k`` neurons; the set is the ``count`` neurons found in most examples (ties: higher summed
score). Default operation: ``scale`` by ``factor`` (IRCAN's enhancement beta).

Example (one JSONL line)::

    {"id": "memotrap-0", "context": "Write a quote that ends in the word \\"kings\\": ",
     "prompt": "No man can serve two", "target": " kings"}

The model input is exactly ``context + prompt`` (no separator is inserted: put any separator at
the end of ``context``, as for MemoTrap where the context is the instruction up to and including
the last ``": "``); the context-free baseline input is ``prompt`` alone. ``--format memotrap`` and
``--format kre`` read those benchmark files directly (:func:`examples_from_items`), so neurons are
found on exactly the prompts ``kn-steer eval`` scores.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from pydantic import Field

from kn_steer.data import ChoiceItem, load_items
from kn_steer.localize.engine import attribute_ids, encode_prompt, encode_target
from kn_steer.localize.examples import Example
from kn_steer.localize.methods.base import (
    Context,
    ExampleMethod,
    ExampleResult,
    Selection,
    top_scored,
)
from kn_steer.localize.methods.kn import AttributionParams
from kn_steer.sets.format import Neuron, Operation


class IRCANExample(Example):
    """A context, a question/prompt, and the context-faithful answer."""

    context: str = Field(min_length=1)
    prompt: str = Field(min_length=1)

    @property
    def full_prompt(self) -> str:
        return self.context + self.prompt


class IRCANParams(AttributionParams):
    top_k: int = Field(20, ge=1, description="neurons kept per example (k)")
    count: int = Field(14, ge=1, description="neurons in the set (h): the most frequent across examples")
    factor: float = Field(2.0, description="default operation: scale (enhance) by this factor (beta)")


def score(ctx: Context, example: IRCANExample, params: IRCANParams) -> ExampleResult:
    result = attribute_ids(
        ctx.model, encode_prompt(ctx.tokenizer, example.full_prompt),
        encode_target(ctx.tokenizer, example.target),
        baseline_ids=encode_prompt(ctx.tokenizer, example.prompt), steps=params.steps,
        target_mode=params.target_mode, first_order=params.first_order, step_chunk=ctx.step_chunk,
    )
    return ExampleResult(neurons=top_scored(result.scores, params.top_k), info={"objective": result.objective})


def select(results: list[ExampleResult], params: IRCANParams) -> Selection:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    sums: dict[tuple[int, int], float] = defaultdict(float)
    for result in results:
        for n in result.neurons[: params.top_k]:
            counts[(n.layer, n.index)] += 1
            sums[(n.layer, n.index)] += n.score
    ranked = sorted(counts, key=lambda key: (-counts[key], -sums[key]))[: params.count]
    neurons = [Neuron(layer=l, index=i, score=sums[(l, i)] / counts[(l, i)]) for l, i in ranked]
    return Selection(
        neurons=neurons, operation=Operation(op="scale", factor=params.factor),
        metrics={"examples": len(results), "frequency": [counts[key] for key in ranked]},
    )


def examples_from_items(items: Sequence[ChoiceItem]) -> list[IRCANExample]:
    """IRCAN examples of multiple-choice items: input ``context + question``, baseline the question
    alone, target the context-faithful choice."""
    return [IRCANExample(id=item.id, context=item.context, prompt=item.question_prompt,
                         target=item.choices[item.faithful]) for item in items]


def _reader(format: str):
    def read(path: Path, limit: int | None) -> list[IRCANExample]:
        items = load_items(path, format)
        return examples_from_items(items if limit is None else items[:limit])

    return read


IRCAN = ExampleMethod(
    name="ircan", description="IRCAN context-aware neurons (Shi et al. 2024)", params_model=IRCANParams,
    example_model=IRCANExample, score=score, select=select,
    checkpoint_params=("steps", "target_mode", "first_order", "top_k"),
    formats={"memotrap": _reader("memotrap"), "kre": _reader("kre")},
)
