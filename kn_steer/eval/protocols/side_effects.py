"""What a set does beyond its purpose, and how that grows with the dose.

Before a team puts a set on live traffic it asks what the set breaks. One table answers it: each
*measure* (perplexity on held-in English text, accuracy on the multiple-choice tasks, recall of
PARAREL facts the model knows) for the unsteered model, the set at its dose, and random neurons of
the same size and dose (``matched`` per-layer counts and ``uniform``, ``seeds`` each), with paired
tests (Wilcoxon over texts for perplexity, exact McNemar over items for accuracies). A dose sweep
repeats the set and its matched controls (``sweep_seeds``) at each factor (scale) or value (clamp).

Every condition is cached under the model fingerprint, the measure's inputs and the intervention.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data import content_sha256, detect_format, load_items
from kn_steer.data.pararel import load_pararel, relation_prompts
from kn_steer.data.text import load_texts
from kn_steer.eval.api import Evaluator, make_spec, single_intervention, spec_json
from kn_steer.eval.cache import SCORING_VERSION, cache_key, content_key
from kn_steer.eval.controls import CONTROL_KINDS, control_neurons, layer_counts, neuron_spec
from kn_steer.eval.perplexity import perplexity
from kn_steer.stats import compare_paired_binary, compare_paired_signed_rank
from kn_steer.steering.spec import SteeringSpec

Pair = tuple[int, int]


class SideEffectsConfig(BaseModel):
    """Everything the report depends on besides the model and the set."""

    model_config = ConfigDict(extra="forbid")
    text: Path | None = Field(None, description="JSONL file with a 'text' field (perplexity)")
    texts: int = Field(100, ge=1, description="texts used for perplexity")
    max_tokens: int = Field(64, ge=2, description="tokens per text")
    tasks: list[Path] = Field(default_factory=list, description="MemoTrap / COSE_KRE files")
    task_limit: int | None = Field(200, ge=1, description="first items of each task (None: all)")
    rules: list[str] = Field(default_factory=lambda: ["total", "calibrated"], description="scoring rules reported")
    pararel: Path | None = Field(None, description="PARAREL folder (recall of known held-out facts)")
    pararel_facts: int = Field(10, ge=1, description="held-out facts per relation, one prompt each")
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_KINDS))
    seeds: int = Field(5, ge=1)
    doses: list[float] = Field(default_factory=list, description="sweep doses (factor or clamp value); empty: none")
    sweep_seeds: int = Field(2, ge=0, description="matched controls per sweep dose")
    batch_size: int = Field(8, ge=1)


@dataclass
class Measure:
    """One thing a set may break: per-unit outcomes of a condition, their summary, a paired test."""

    name: str
    kind: str  # "perplexity" (lower is better) or "accuracy"
    units: Callable[[Any], list]  # spec (dict or None) -> per-unit outcomes
    summary: Callable[[list], float]
    paired_p: Callable[[list, list], float]
    n: int


def _accuracy(values: list) -> float:
    return sum(bool(v) for v in values) / len(values)


def _mcnemar(arm: list, base: list) -> float:
    return compare_paired_binary(list(zip(map(bool, arm), map(bool, base)))).p_value


def _wilcoxon_nll(arm: list, base: list) -> float:
    return compare_paired_signed_rank([(a[0] / max(a[1], 1), b[0] / max(b[1], 1)) for a, b in zip(arm, base)]).p_value


def build_measures(ev: Evaluator, config: SideEffectsConfig, progress: bool = False) -> list[Measure]:
    """The measures the config names, each reading and caching through ``ev``."""
    measures: list[Measure] = []
    fingerprint = ev.ref.fingerprint

    def cached(kind: str, inputs: str, spec: Any, fn: Callable[[], Any]) -> Any:
        if ev.cache is None:
            return fn()
        key = cache_key(kind=kind, version=SCORING_VERSION, model=fingerprint, inputs=inputs, spec=spec)
        return ev.cache.compute(key, fn)

    if config.text is not None:
        texts = [t.text for t in load_texts(config.text, config.texts)]
        inputs = content_key([texts, config.max_tokens])

        def nll(spec: Any) -> list:
            return cached("text-nll", inputs, spec, lambda: [list(v) for v in ev.text_nll(texts, spec, config.max_tokens)])

        measures.append(Measure(f"perplexity ({Path(config.text).name}, {len(texts)} texts)", "perplexity", nll,
                                lambda units: perplexity([tuple(u) for u in units]), _wilcoxon_nll, len(texts)))
    for task in config.tasks:
        items = load_items(task, detect_format(task))
        items = items if config.task_limit is None else items[: config.task_limit]
        encoded = ev.encode(items)
        for rule in config.rules:
            measures.append(Measure(
                f"{Path(task).name} accuracy ({rule} log-prob)", "accuracy",
                lambda spec, enc=encoded, r=rule: [s.correct_by(r) for s in ev.score(enc, spec, progress=progress)],
                _accuracy, _mcnemar, len(items)))
    if config.pararel is not None:
        prompts = relation_prompts(load_pararel(config.pararel), "test", config.pararel_facts, 1)

        def recall(spec: Any, chosen: Sequence[Any]) -> list:
            inputs = content_key([[p.prompt, p.target] for p in chosen])
            return cached("prompt-correct", inputs, spec, lambda: ev.prompt_correct(
                [p.prompt for p in chosen], [p.target for p in chosen], spec))

        known = [p for p, ok in zip(prompts, recall(None, prompts)) if ok]
        if known:
            measures.append(Measure(f"PARAREL recall ({len(known)} known held-out prompts)", "accuracy",
                                    lambda spec: recall(spec, known), _accuracy, _mcnemar, len(known)))
    if not measures:
        raise ValueError("no measure: give a text file, a task file or a PARAREL folder")
    return measures


def _dose_of(dose: dict[str, Any], amount: float) -> dict[str, Any]:
    return {**dose, "factor": amount} if dose["op"] == "scale" else {**dose, "value": amount}


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def run(ev: Evaluator, steering: SteeringSpec | dict[str, Any] | str | None, config: SideEffectsConfig,
        set_name: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The side-effect table (and dose sweep) of one set or one-intervention spec; JSON-ready."""
    spec = make_spec(steering, set_name)
    if spec is None:
        raise ValueError("side effects need a set or a spec")
    uses_sets = any(iv.set is not None for iv in spec.interventions)
    neurons, dose = single_intervention(spec, ev.sets if uses_sets else {})
    measures = build_measures(ev, config)
    # the set as an explicit neuron list: the same intervention, and cacheable by content
    conditions: list[tuple[str, Any]] = [("unsteered", None), ("set", neuron_spec(neurons, **dose))]
    for kind in config.controls:
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}; known: {', '.join(CONTROL_KINDS)}")
        conditions += [(f"{kind}/{seed}", neuron_spec(control_neurons(kind, neurons, ev.shape, seed), **dose))
                       for seed in range(config.seeds)]
    for amount in config.doses:
        conditions.append((f"sweep/set/{amount:g}", neuron_spec(neurons, **_dose_of(dose, amount))))
        conditions += [(f"sweep/matched/{amount:g}/{seed}",
                        neuron_spec(control_neurons("matched", neurons, ev.shape, seed), **_dose_of(dose, amount)))
                       for seed in range(config.sweep_seeds)]
    units: dict[str, dict[str, list]] = {}
    bar = tqdm(total=len(conditions) * len(measures), desc="side effects", unit="measure", disable=not progress)
    for label, cond in conditions:
        units[label] = {}
        for m in measures:
            units[label][m.name] = m.units(cond)
            bar.update(1)
    bar.close()

    table = []
    for m in measures:
        base, mine = units["unsteered"][m.name], units["set"][m.name]
        row: dict[str, Any] = {"measure": m.name, "kind": m.kind, "n": m.n, "unsteered": m.summary(base),
                               "set": m.summary(mine), "p_set_vs_unsteered": m.paired_p(mine, base)}
        for kind in config.controls:
            runs = [units[f"{kind}/{s}"][m.name] for s in range(config.seeds)]
            row[kind] = {**_mean_sd([m.summary(r) for r in runs]),
                         "p_vs_unsteered": [m.paired_p(r, base) for r in runs],
                         "p_set_vs_control": [m.paired_p(mine, r) for r in runs]}
        table.append(row)
    sweep = []
    for amount in config.doses:
        point: dict[str, Any] = {"dose": amount}
        for m in measures:
            ctrl = [m.summary(units[f"sweep/matched/{amount:g}/{s}"][m.name]) for s in range(config.sweep_seeds)]
            point[m.name] = {"set": m.summary(units[f"sweep/set/{amount:g}"][m.name]),
                             "matched": _mean_sd(ctrl) if ctrl else None}
        sweep.append(point)
    return {
        "protocol": "side-effects", "backend": ev.backend, "server": getattr(ev, "url", None),
        "model": ev.ref.name, "model_fingerprint": ev.ref.fingerprint,
        "set": set_name, "spec": spec_json(spec), "neurons": len(neurons), "layers": layer_counts(neurons),
        "dose": dose, "config": config.model_dump(mode="json"),
        "data_sha256": {str(p): content_sha256(p) for p in [config.text, *config.tasks, config.pararel] if p},
        "unsteered": {m.name: m.summary(units["unsteered"][m.name]) for m in measures},
        "table": table, "sweep": sweep,
    }


def default_doses(op: str) -> list[float]:
    """A sweep around the papers' doses: scale 0 (off) to 8; clamp 0 to a few times a typical activation."""
    return [0.0, 1.0, 2.0, 4.0, 8.0] if op == "scale" else [0.0, 0.5, 1.0, 2.0, 4.0]


__all__ = ["Measure", "SideEffectsConfig", "build_measures", "default_doses", "run"]
