"""Evaluate a dataset under an intervention: the Python API behind ``kn-steer eval``.

Per item, every candidate continuation gets its total log-probability given the prompt; the
highest wins. *accuracy* is the share of items won by the context-faithful choice, *trap rate*
the share won by the memorised trap. Two backends compute the same numbers: ``hf`` (the
transformers reference with :func:`kn_steer.reference.steer`, float32, batched) and ``vllm``
(the serving path: vLLM with the kn-steer plugin and prompt log-probabilities).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from kn_steer.data import ChoiceItem, load_items
from kn_steer.errors import KnSteerError
from kn_steer.eval.scoring import ItemScore
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.spec import SteeringSpec, parse_spec

Backend = Literal["hf", "vllm"]


def summarize(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """Accuracy (context-faithful choice wins) and trap rate (memorised trap wins)."""
    n = len(scores)
    with_trap = [s for s in scores if s.trap is not None]
    return {
        "n": n,
        "accuracy": sum(s.correct for s in scores) / n if n else float("nan"),
        "trap_rate": sum(s.trapped for s in with_trap) / len(with_trap) if with_trap else float("nan"),
        "mean_margin": (sum(s.logprobs[s.faithful] - max(v for i, v in enumerate(s.logprobs) if i != s.faithful)
                            for s in scores) / n) if n else float("nan"),
    }


def make_spec(spec: SteeringSpec | Mapping[str, Any] | str | None = None,
              set_name: str | None = None) -> SteeringSpec | None:
    """One spec from ``--spec`` (JSON or dict) or ``--set NAME`` (its default operation)."""
    if spec is not None and set_name is not None:
        raise KnSteerError("give either a spec or a set name, not both")
    if set_name is not None:
        return SteeringSpec.model_validate({"interventions": [{"set": set_name}]})
    if spec is None:
        return None
    if isinstance(spec, str) and spec.startswith("@"):
        path = Path(spec[1:])
        try:
            spec = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KnSteerError(f"cannot read spec file {path}: {exc.strerror}") from exc
    parsed = parse_spec(spec, where="spec")
    return parsed if parsed.interventions else None


def _needs_sets(spec: SteeringSpec | None) -> bool:
    return spec is not None and any(iv.set is not None for iv in spec.interventions)


class HFEvaluator:
    """A loaded transformers model that scores item lists under any number of specs."""

    def __init__(self, model: str | Path = "smollm2-135m", sets_dir: str | Path | None = None,
                 batch_size: int = 16, device: str = "cpu"):
        from kn_steer.models import load_hf_model, resolve_model
        from kn_steer.models.families import ModelShape
        from kn_steer.sets.format import model_identity

        self.ref = resolve_model(model)
        self.model, self.tokenizer = load_hf_model(self.ref, device=device)
        self.shape = ModelShape.from_config(self.model.config)
        self.identity = model_identity(self.ref, self.model.config)
        self.sets_dir = sets_dir
        self.batch_size = batch_size
        self._sets: Mapping[str, Any] | None = None

    @property
    def sets(self) -> Mapping[str, Any]:
        if self._sets is None:
            from kn_steer.sets.registry import NeuronSetRegistry

            self._sets = NeuronSetRegistry.load(self.sets_dir, self.identity)
        return self._sets

    def compile(self, spec: SteeringSpec | Mapping[str, Any] | str | None) -> CompiledSteering | None:
        spec = make_spec(spec) if spec is not None else None
        if spec is None:
            return None
        return compile_spec(spec, self.sets if _needs_sets(spec) else {}, self.shape)

    def encode(self, items: Sequence[ChoiceItem]):
        from kn_steer.eval.scoring import encode_items

        return encode_items(self.tokenizer, items)

    def score(self, items: Sequence[Any], spec: SteeringSpec | Mapping[str, Any] | str | None = None,
              progress: bool = False) -> list[ItemScore]:
        from kn_steer.eval.scoring import score_hf

        return score_hf(self.model, self.tokenizer, items, self.compile(spec),
                        batch_size=self.batch_size, progress=progress)


@dataclass
class EvalResult:
    """Summary numbers plus per-item scores, ready to write as JSON."""

    data: str
    format: str
    backend: str
    model: str
    spec: dict[str, Any] | None
    summary: dict[str, Any]
    items: list[ItemScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "format": self.format, "backend": self.backend, "model": self.model,
                "spec": self.spec, **self.summary, "items": [s.to_json() for s in self.items]}


def evaluate(
    data: str | Path,
    format: str,
    spec: SteeringSpec | Mapping[str, Any] | str | None = None,
    set_name: str | None = None,
    *,
    model: str | Path = "smollm2-135m",
    backend: Backend = "hf",
    limit: int | None = None,
    sets_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> EvalResult:
    """Score ``data`` (MemoTrap or COSE_KRE file) under a spec or a named set, or unsteered."""
    items = load_items(data, format)
    if limit is not None:
        items = items[:limit]
    steering = make_spec(spec, set_name)
    if backend == "hf":
        evaluator = HFEvaluator(model, sets_dir=sets_dir, batch_size=batch_size)
        scores = evaluator.score(items, steering, progress=progress)
        model_name = evaluator.ref.name
    elif backend == "vllm":
        from kn_steer.eval.vllm_backend import VLLMEvaluator

        vevaluator = VLLMEvaluator(model, sets_dir=sets_dir)
        scores = vevaluator.score(items, steering)
        model_name = vevaluator.ref.name
    else:
        raise KnSteerError(f"unknown backend {backend!r}; use 'hf' or 'vllm'")
    return EvalResult(
        data=str(data), format=format, backend=backend, model=model_name,
        spec=json.loads(steering.model_dump_json(exclude_none=True)) if steering else None,
        summary=summarize(scores), items=scores,
    )
