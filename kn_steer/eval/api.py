"""Evaluate a dataset under an intervention: the Python API behind ``kn-steer eval``.

Per item, every candidate continuation is scored (:mod:`kn_steer.eval.scoring`: total,
length-normalized and calibrated log-probability); *accuracy* is the share of items won by the
context-faithful choice, *trap rate* the share won by the memorised trap. Two backends compute the
same numbers: ``hf`` (the transformers reference, float32, batched) and ``vllm`` (the serving
path: vLLM with the kn-steer plugin and prompt log-probabilities).

A steered evaluation is always reported beside the unsteered baseline on the same items, with the
exact McNemar test per scoring rule; on request, random controls of the same size and dose
(``matched`` per-layer counts, ``uniform``; :mod:`kn_steer.eval.controls`) over several seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

from kn_steer.data import ChoiceItem, content_sha256, load_items
from kn_steer.errors import KnSteerError
from kn_steer.eval.cache import SCORING_VERSION, ResultCache, cache_key, content_key
from kn_steer.eval.controls import CONTROL_KINDS, control_neurons, neuron_spec
from kn_steer.eval.scoring import EncodedItem, ItemScore, encode_items, score_hf
from kn_steer.eval.summary import control_summary, paired, rules_of, summarize
from kn_steer.models import load_hf_model, resolve_model
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import model_identity
from kn_steer.sets.registry import NeuronSetRegistry
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.spec import SteeringSpec, parse_spec

Backend = Literal["hf", "vllm", "server"]
Scorer = Callable[[Sequence[EncodedItem], "dict[str, Any] | None"], "list[ItemScore]"]


def make_spec(spec: SteeringSpec | Mapping[str, Any] | str | None = None,
              set_name: str | None = None) -> SteeringSpec | None:
    """One spec from ``--spec`` (JSON or dict) or ``--set NAME`` (its default operation)."""
    if spec is not None and set_name is not None:
        raise KnSteerError("give either a spec or a set name, not both")
    if set_name is not None:
        return SteeringSpec.model_validate({"interventions": [{"set": set_name}]})
    if spec is None:
        return None
    if isinstance(spec, SteeringSpec):
        return spec if spec.interventions else None
    if isinstance(spec, str) and spec.startswith("@"):
        path = Path(spec[1:])
        try:
            spec = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KnSteerError(f"cannot read spec file {path}: {exc.strerror}") from exc
    parsed = parse_spec(spec, where="spec")
    return parsed if parsed.interventions else None


def spec_json(spec: SteeringSpec | None) -> dict[str, Any] | None:
    return None if spec is None else json.loads(spec.model_dump_json(exclude_none=True))


def _needs_sets(spec: SteeringSpec | None) -> bool:
    return spec is not None and any(iv.set is not None for iv in spec.interventions)


class Evaluator(Protocol):
    """What a protocol reads from a backend: the transformers reference (:class:`HFEvaluator`) or a
    running server (:class:`kn_steer.eval.server_backend.ServerEvaluator`)."""

    backend: str  # "hf" or "server"
    ref: Any  # the resolved model (name, fingerprint)
    shape: ModelShape
    cache: ResultCache | None

    @property
    def sets(self) -> Mapping[str, Any]: ...

    def encode(self, items: Sequence[ChoiceItem]) -> list[EncodedItem]: ...

    def score(self, items: Sequence[Any], spec: Any = None, progress: bool = False) -> list[ItemScore]: ...

    def text_nll(self, texts: Sequence[str], spec: Any, max_tokens: int) -> list[tuple[float, int]]: ...

    def prompt_correct(self, prompts: Sequence[str], targets: Sequence[str], spec: Any) -> list[bool]: ...


class HFEvaluator:
    """A loaded transformers model that scores item lists under any number of specs.

    With a ``cache``, scores of explicit neuron specs are stored under a key of the model
    fingerprint, the items' token ids and labels, the spec and :data:`SCORING_VERSION`: protocols
    that score hundreds of conditions resume where they stopped."""

    backend = "hf"

    def __init__(self, model: str | Path = "smollm2-135m", sets_dir: str | Path | None = None,
                 batch_size: int = 16, device: str = "cpu", cache: ResultCache | None = None,
                 calibrate: bool = True):
        self.ref = resolve_model(model)
        self.model, self.tokenizer = load_hf_model(self.ref, device=device)
        self.shape = ModelShape.from_config(self.model.config)
        self.identity = model_identity(self.ref, self.model.config)
        self.sets_dir = sets_dir
        self.batch_size = batch_size
        self.cache = cache
        self.calibrate = calibrate
        self._sets: Mapping[str, Any] | None = None

    @property
    def sets(self) -> Mapping[str, Any]:
        if self._sets is None:
            self._sets = NeuronSetRegistry.load(self.sets_dir, self.identity)
        return self._sets

    def compile(self, spec: SteeringSpec | Mapping[str, Any] | str | None) -> CompiledSteering | None:
        steering = make_spec(spec)
        if steering is None:
            return None
        return compile_spec(steering, self.sets if _needs_sets(steering) else {}, self.shape)

    def encode(self, items: Sequence[ChoiceItem]) -> list[EncodedItem]:
        return encode_items(self.tokenizer, items)

    def text_nll(self, texts: Sequence[str], spec: Any, max_tokens: int) -> list[tuple[float, int]]:
        """(summed NLL, predicted tokens) per text (:func:`kn_steer.eval.perplexity.text_nll`)."""
        from kn_steer.eval.perplexity import text_nll

        return text_nll(self.model, self.tokenizer, texts, self.compile(spec), max_tokens, self.batch_size)

    def prompt_correct(self, prompts: Sequence[str], targets: Sequence[str], spec: Any) -> list[bool]:
        """Whether each target's first token is the argmax after its prompt."""
        from kn_steer.localize.prompt_scores import score_prompts

        return score_prompts(self.model, self.tokenizer, prompts, targets, self.compile(spec)).correct.tolist()

    def score(self, items: Sequence[Any], spec: SteeringSpec | Mapping[str, Any] | str | None = None,
              progress: bool = False) -> list[ItemScore]:
        encoded = [e for e in items if isinstance(e, EncodedItem)]
        if len(encoded) != len(items):
            encoded = self.encode(items)
        steering = make_spec(spec)

        def run() -> list[ItemScore]:
            return score_hf(self.model, self.tokenizer, encoded, self.compile(steering),
                            batch_size=self.batch_size, progress=progress, calibrate=self.calibrate)

        if self.cache is None or _needs_sets(steering):
            return run()
        key = cache_key(kind="choice-scores", version=SCORING_VERSION, model=self.ref.fingerprint,
                        calibrate=self.calibrate, spec=spec_json(steering),
                        items=content_key([[e.item.id, e.prompt_ids, e.choice_ids, e.neutral_ids,
                                            e.item.faithful, e.item.trap] for e in encoded]))
        stored = self.cache.compute(key, lambda: [s.to_json() for s in run()])
        return [ItemScore.from_json(s) for s in stored]


@dataclass
class EvalResult:
    """Summary numbers plus per-item scores of the steered condition and the unsteered baseline,
    the paired tests between them, and random controls when asked; ready to write as JSON."""

    data: str
    format: str
    backend: str
    model: str
    spec: dict[str, Any] | None
    summary: dict[str, Any]
    items: list[ItemScore] = field(default_factory=list)
    data_sha256: str | None = None
    baseline: dict[str, Any] | None = None
    baseline_items: list[ItemScore] = field(default_factory=list)
    comparisons: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"data": self.data, "data_sha256": self.data_sha256, "format": self.format, "backend": self.backend,
               "model": self.model, "spec": self.spec, **self.summary,
               "items": [s.to_json() for s in self.items]}
        if self.baseline is not None:
            out["unsteered"] = {**self.baseline, "items": [s.to_json() for s in self.baseline_items]}
            out["mcnemar_vs_unsteered"] = self.comparisons
        if self.controls:
            out["controls"] = self.controls
        return out


def single_intervention(spec: SteeringSpec, sets: Mapping[str, Any]) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """The neurons and operation of a one-intervention spec (a set with its default operation, or
    an explicit neuron list): what a random control must copy."""
    if len(spec.interventions) != 1:
        raise KnSteerError("random controls need a spec with exactly one intervention (a set or a neuron list)")
    (iv,) = spec.interventions
    if iv.layers is not None or iv.positions != "all":
        raise KnSteerError("random controls need an intervention at every position of every layer")
    if iv.set is not None:
        ns = sets[iv.set]
        if any(n.factor is not None or n.value is not None for n in ns.neurons):
            raise KnSteerError(f"set {iv.set!r} has per-neuron values: random controls cannot copy its dose")
        neurons = [(n.layer, n.index) for n in ns.neurons]
        op = iv.op or ns.operation.op
        factor = iv.factor if iv.factor is not None else ns.operation.factor
        value = iv.value if iv.value is not None else ns.operation.value
    else:
        neurons, op, factor, value = list(iv.neurons or []), iv.op, iv.factor, iv.value
    return neurons, {"op": op, "factor": factor, "value": value}


def compare_conditions(scorer: Scorer, encoded: Sequence[EncodedItem], steering: SteeringSpec | None,
                       sets: Mapping[str, Any], shape: ModelShape, controls: Sequence[str] = (),
                       seeds: int = 5) -> dict[str, Any]:
    """Unsteered, steered and random controls on the same items, with every paired test."""
    for kind in controls:
        if kind not in CONTROL_KINDS:
            raise KnSteerError(f"unknown control kind {kind!r}; known: {', '.join(CONTROL_KINDS)}")
    if controls and steering is None:
        raise KnSteerError("random controls need a steering spec or set to copy")
    baseline = scorer(encoded, None)
    steered = scorer(encoded, spec_json(steering)) if steering is not None else baseline
    rules = rules_of(baseline)
    out: dict[str, Any] = {"unsteered": baseline, "steered": steered, "controls": {}, "comparisons": {}}
    if steering is not None:
        out["comparisons"] = {rule: paired(steered, baseline, rule) for rule in rules}
    if controls:
        neurons, dose = single_intervention(steering, sets)  # type: ignore[arg-type]
        for kind in controls:
            runs = [scorer(encoded, neuron_spec(control_neurons(kind, neurons, shape, seed), **dose))
                    for seed in range(seeds)]
            out["controls"][kind] = {rule: control_summary(runs, baseline, steered, rule) for rule in rules}
    return out


def evaluate(
    data: str | Path,
    format: str,
    spec: SteeringSpec | Mapping[str, Any] | str | None = None,
    set_name: str | None = None,
    *,
    model: str | Path | None = None,
    backend: Backend = "hf",
    limit: int | None = None,
    sets_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
    controls: Sequence[str] = (),
    seeds: int = 5,
    server: str | None = None,
    api_key: str | None = None,
) -> EvalResult:
    """Score ``data`` (MemoTrap or COSE_KRE file) unsteered and under a spec or a named set (with
    the paired tests), and under random controls of the same dose if ``controls`` names kinds."""
    items = load_items(data, format)
    if limit is not None:
        items = items[:limit]
    steering = make_spec(spec, set_name)
    if backend in ("hf", "server"):
        if backend == "server":
            from kn_steer.eval.server_backend import ServerEvaluator

            if server is None:
                raise KnSteerError("the server backend needs the server's URL")
            evaluator: Evaluator = ServerEvaluator(server, api_key=api_key, model=model)
        else:
            evaluator = HFEvaluator(model or "smollm2-135m", sets_dir=sets_dir, batch_size=batch_size)
        encoded = evaluator.encode(items)

        def scorer(enc: Sequence[EncodedItem], s: dict[str, Any] | None) -> list[ItemScore]:
            return evaluator.score(enc, s, progress=progress)

        model_name, shape, sets = evaluator.ref.name, evaluator.shape, (evaluator.sets if steering else {})
    elif backend == "vllm":
        from kn_steer.eval.vllm_backend import (
            VLLMEvaluator,  # vLLM is an optional dependency
        )

        vevaluator = VLLMEvaluator(model or "smollm2-135m", sets_dir=sets_dir)
        encoded = encode_items(vevaluator.tokenizer, items)

        def scorer(enc: Sequence[EncodedItem], s: dict[str, Any] | None) -> list[ItemScore]:
            return vevaluator.score(enc, s)

        model_name, shape = vevaluator.ref.name, vevaluator.shape
        sets = vevaluator.sets if _needs_sets(steering) else {}
    else:
        raise KnSteerError(f"unknown backend {backend!r}; use 'hf', 'vllm' or 'server'")
    compared = compare_conditions(scorer, encoded, steering, sets, shape, controls, seeds)
    baseline = compared["unsteered"]
    return EvalResult(
        data=str(data), format=format, backend=backend, model=model_name, spec=spec_json(steering),
        summary=summarize(compared["steered"]), items=compared["steered"],
        data_sha256=content_sha256(data),
        baseline=summarize(baseline) if steering is not None else None,
        baseline_items=baseline if steering is not None else [],
        comparisons=compared["comparisons"], controls=compared["controls"],
    )
