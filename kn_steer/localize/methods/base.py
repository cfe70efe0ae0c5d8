"""What a localization method is: three kinds, one small contract each.

* :class:`ExampleMethod` — *per-example*: each example is scored on its own (integrated gradients
  for one fact or one context/question pair) into an :class:`ExampleResult`; ``select`` turns all
  results into the set. Results are checkpointed per example, so long runs resume, and only the
  ``checkpoint_params`` key them: re-selecting with another ``count`` reuses finished examples.
* :class:`WeightMethod` — *weights*: the model's weights alone (no data), e.g. each neuron's
  direction read through the LM head.
* :class:`CorpusMethod` — *corpus*: statistics accumulated over a whole corpus (e.g. each
  neuron's average precision as a detector of one relation among all relations' prompts) into
  :class:`CorpusStats`; ``select`` picks the set from them. A corpus is built from a data folder
  *under the method's parameters* (how many facts, which split), so the parameters alone say
  what was read.

All have a name, a pydantic parameter model (it generates the CLI options and validates
``method.params`` of every set the method writes) and the data formats they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kn_steer.errors import KnSteerError
from kn_steer.localize.examples import Example, load_examples
from kn_steer.localize.ranking import top_flat
from kn_steer.sets.format import Direction, Head, Neuron, Operation


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
class CorpusStats:
    """A corpus method's statistics: one score per neuron ``[layers, units]`` and diagnostics."""

    scores: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """The final set: neurons or attention heads (with scores), or residual-stream directions, the
    default operation and metrics for the file."""

    neurons: list[Neuron]
    operation: Operation
    metrics: dict[str, Any] = field(default_factory=dict)
    directions: list[Direction] = field(default_factory=list)
    heads: list[Head] = field(default_factory=list)


@dataclass
class Context:
    """What a method needs to compute: the model, its tokenizer and compute options."""

    model: Any
    tokenizer: Any
    step_chunk: int | None = None
    progress: bool = False
    #: where a corpus method that supports it reads activations instead of transformers hooks: an
    #: :class:`kn_steer.activations.engine.ActivationEngine` (vLLM, the serving path's read op)
    activations: Any = None


def parse_params(name: str, model: type[BaseModel], values: Mapping[str, Any]) -> BaseModel:
    """Validate ``values`` (None means "not given": the model's default) against ``model``."""
    try:
        return model.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise KnSteerError(f"invalid parameters for method {name!r}:\n{exc}") from exc


def top_scored(scores: torch.Tensor, k: int) -> list[ScoredNeuron]:
    """The ``k`` highest-scoring neurons of a ``[layers, units]`` score matrix, best first."""
    return [ScoredNeuron(layer=l, index=i, score=s) for l, i, s in top_flat(scores, k)]


#: A dataset format reader: ``(path, limit) -> examples`` (per-example methods).
ExampleReader = Callable[[Path, Union[int, None]], list]


class _Parameterized:
    """What every kind shares: a name and a parameter model that validates given values."""

    name: str
    params_model: type[BaseModel]

    def parse_params(self, values: Mapping[str, Any]) -> BaseModel:
        return parse_params(self.name, self.params_model, values)


@dataclass(frozen=True)
class ExampleMethod(_Parameterized):
    """A per-example method (see the module docstring)."""

    kind: ClassVar[Literal["example"]] = "example"
    name: str
    description: str
    params_model: type[BaseModel]
    example_model: type[Example]
    score: Callable[[Context, Any, Any], ExampleResult]
    select: Callable[[list[ExampleResult], Any], Selection]
    checkpoint_params: tuple[str, ...]
    #: dataset formats besides ``jsonl`` (the example model's own JSONL)
    formats: Mapping[str, ExampleReader] = field(default_factory=dict)

    @property
    def format_names(self) -> tuple[str, ...]:
        return ("jsonl", *self.formats)

    def load(self, path: str | Path, format: str = "jsonl", limit: int | None = None) -> list[Any]:
        """The examples of a file in one of :attr:`format_names`."""
        path = Path(path)
        if format == "jsonl":
            return load_examples(path, self.example_model, limit)
        reader = self.formats.get(format)
        if reader is None:
            raise KnSteerError(f"method {self.name!r} reads --format {' | '.join(self.format_names)}, "
                               f"not {format!r}")
        return reader(path, limit)


@dataclass(frozen=True)
class CorpusMethod(_Parameterized):
    """A corpus method (see the module docstring)."""

    kind: ClassVar[Literal["corpus"]] = "corpus"
    name: str
    description: str
    params_model: type[BaseModel]
    corpus_model: type[BaseModel]
    #: ``(path, format, params, limit) -> corpus``
    load_corpus: Callable[[Path, str, Any, Union[int, None]], Any]
    accumulate: Callable[[Context, Any, Any], CorpusStats]
    select: Callable[[CorpusStats, Any], Selection]
    formats: tuple[str, ...] = ()
    #: where its activation pass can run: ``hf`` (transformers hooks) and, if listed, ``vllm``
    backends: tuple[str, ...] = ("hf",)

    @property
    def format_names(self) -> tuple[str, ...]:
        return self.formats

    def load(self, path: str | Path, format: str, params: BaseModel, limit: int | None = None) -> Any:
        if format not in self.formats:
            raise KnSteerError(f"method {self.name!r} reads --format {' | '.join(self.formats)}, "
                               f"not {format!r}")
        return self.load_corpus(Path(path), format, params, limit)


@dataclass(frozen=True)
class WeightMethod(_Parameterized):
    """A weights method: reads the model's weights only, no data (e.g. neurons read through the LM
    head); ``select`` computes the set from the model in ``Context``."""

    kind: ClassVar[Literal["weights"]] = "weights"
    name: str
    description: str
    params_model: type[BaseModel]
    select: Callable[[Context, Any], Selection]

    @property
    def format_names(self) -> tuple[str, ...]:
        return ()


Method = Union[ExampleMethod, CorpusMethod, WeightMethod]

