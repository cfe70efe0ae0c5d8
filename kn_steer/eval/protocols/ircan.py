"""IRCAN (Shi et al. 2024) as a protocol: context-aware neurons found on dev, judged on test.

1. **Localize** on the first ``loc_n`` dev items with the library's ``ircan`` method (exact
   integrated gradients from the context-free prompt's activations to those with the context,
   target = first token of the context-faithful answer; per item the top ``top_k``). Per-example
   results are checkpointed under the dev file's sha256 and the method's per-example parameters.
2. **Grid** on the rest of dev (never on test): the ``h`` most frequent neurons scaled by ``beta``
   at every position, for every ``h`` x ``beta``; per scoring rule (total, length-normalized,
   calibrated) the best cell by accuracy (ties: lower trap rate, then smaller h and beta).
3. **Test**: for each chosen cell, the set against the unsteered model (exact McNemar per rule,
   accuracy split by the correct choice's relative length) and against random neurons of the same
   count and beta, drawn with the set's per-layer counts (``matched``) and uniformly, over
   ``seeds`` seeds, each with its own tests against unsteered and against the set.

:func:`transfer` scores a set chosen on one dataset on another dataset's test split,
:func:`retest` scores a finished run's sets on its own test split again under other controls (more
seeds) without localizing again, and :func:`run_combined` localizes one set over several datasets'
dev splits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kn_steer.data import ChoiceItem, content_sha256, load_items
from kn_steer.errors import KnSteerError
from kn_steer.eval.api import HFEvaluator, compare_conditions, make_spec, spec_json
from kn_steer.eval.cache import cache_key
from kn_steer.eval.controls import CONTROL_KINDS, layer_counts, neuron_spec
from kn_steer.eval.scoring import RULES, EncodedItem, ItemScore
from kn_steer.eval.summary import rules_of, summarize
from kn_steer.localize.command import localize_command, model_argument
from kn_steer.localize.methods import Context, ExampleResult
from kn_steer.localize.methods.ircan import IRCAN, IRCANParams, examples_from_items
from kn_steer.localize.runner import (
    RunInfo,
    checkpoint_header,
    run_localization,
    score_examples,
)
from kn_steer.models.checkpoints import cache_dir
from kn_steer.sets.format import NeuronSet

Pair = tuple[int, int]


class IRCANConfig(BaseModel):
    """Everything the protocol's numbers depend on besides the data and the model."""

    model_config = ConfigDict(extra="forbid")
    loc_n: int = Field(200, ge=1, description="first dev items used to localize")
    grid_n: int | None = Field(None, ge=1, description="dev items after those for the grid (None: the rest)")
    test_n: int | None = Field(None, ge=1, description="first test items (None: all)")
    steps: int = Field(20, ge=1, description="integrated-gradients steps m")
    top_k: int = Field(20, ge=1, description="neurons kept per example (k)")
    hs: list[int] = Field(default_factory=lambda: [5, 10, 20, 40, 80], description="grid of set sizes h")
    betas: list[float] = Field(default_factory=lambda: [2.0, 4.0, 8.0], description="grid of factors beta")
    seeds: int = Field(5, ge=1, description="random-control seeds per kind")
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_KINDS))
    control_rules: list[str] = Field(
        default_factory=lambda: ["total"],
        description="rules whose chosen cell is tested against random controls (the others: against unsteered)")
    batch_size: int = Field(16, ge=1)

    def method_params(self, count: int = 1, factor: float = 1.0) -> IRCANParams:
        return IRCANParams(steps=self.steps, top_k=self.top_k, count=count, factor=factor)


@dataclass
class ChoiceData:
    """One dataset: a name, its format and its dev and test files (any names)."""

    name: str
    format: str
    dev: Path
    test: Path
    dev_items: list[ChoiceItem] = field(default_factory=list)
    test_items: list[ChoiceItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dev, self.test = Path(self.dev), Path(self.test)
        self.dev_items = load_items(self.dev, self.format)
        self.test_items = load_items(self.test, self.format)

    def splits(self, config: IRCANConfig) -> tuple[list[ChoiceItem], list[ChoiceItem], list[ChoiceItem]]:
        """(localization, grid, test) items."""
        loc = self.dev_items[: config.loc_n]
        rest = self.dev_items[config.loc_n:]
        grid = rest if config.grid_n is None else rest[: config.grid_n]
        test = self.test_items if config.test_n is None else self.test_items[: config.test_n]
        if not grid:
            raise ValueError(f"{self.dev}: no dev items left for the grid after the first {config.loc_n}")
        return loc, grid, test

    def describe(self, config: IRCANConfig) -> dict[str, Any]:
        loc, grid, test = self.splits(config)
        return {"name": self.name, "format": self.format, "dev": str(self.dev), "test": str(self.test),
                "dev_sha256": content_sha256(self.dev), "test_sha256": content_sha256(self.test),
                "loc_split": f"dev[:{len(loc)}]", "grid_split": f"dev[{len(loc)}:{len(loc) + len(grid)}]",
                "test_split": f"test[:{len(test)}]"}


def localization_checkpoint(data: ChoiceData, params: IRCANParams, fingerprint: str,
                            folder: Path | None = None) -> Path:
    """Where per-example results of ``data``'s dev file live (keyed by its content and the header);
    ``folder`` defaults to ``$KN_STEER_CACHE/localize``."""
    header = cache_key(**checkpoint_header(IRCAN, params, fingerprint))[:12]
    folder = folder if folder is not None else cache_dir() / "localize"
    return folder / f"ircan-{content_sha256(data.dev)[:16]}-{header}.jsonl"


def localize(ev: HFEvaluator, data: ChoiceData, config: IRCANConfig, progress: bool = True,
             checkpoints: Path | None = None) -> list[ExampleResult]:
    """Per-example results of the localization split (resumed from the checkpoint)."""
    loc, _, _ = data.splits(config)
    params = config.method_params()
    ctx = Context(ev.model, ev.tokenizer, progress=progress)
    results, _ = score_examples(IRCAN, params, examples_from_items(loc), ctx, ev.ref.fingerprint,
                                localization_checkpoint(data, params, ev.ref.fingerprint, checkpoints), str(data.dev))
    return results


def ranked_neurons(results: Sequence[ExampleResult], config: IRCANConfig, count: int) -> list[Pair]:
    """The ``count`` most frequent neurons (the library's ``ircan`` selection)."""
    chosen = IRCAN.select(list(results), config.method_params(count=count))
    return [(n.layer, n.index) for n in chosen.neurons]


def _scale(neurons: Sequence[Pair], beta: float) -> dict[str, Any] | None:
    return neuron_spec(neurons, "scale", factor=beta)


def grid(ev: HFEvaluator, results: Sequence[ExampleResult], encoded: Sequence[EncodedItem],
         config: IRCANConfig, progress: bool = False) -> dict[str, Any]:
    """Every (h, beta) cell on the grid items, and per rule the chosen cell."""
    base = ev.score(encoded, None, progress=progress)
    rows = [{"h": 0, "beta": 1.0, **summarize(base)}]
    for h in config.hs:
        neurons = ranked_neurons(results, config, h)
        for beta in config.betas:
            rows.append({"h": h, "beta": beta, **summarize(ev.score(encoded, _scale(neurons, beta), progress=progress))})
    chosen = {}
    for rule in rules_of(base):
        best = max(rows[1:], key=lambda r: (round(r["rules"][rule]["accuracy"], 9),
                                            -round(r["rules"][rule]["trap_rate"], 9), -r["h"], -r["beta"]))
        chosen[rule] = {"h": best["h"], "beta": best["beta"], "dev_accuracy": best["rules"][rule]["accuracy"],
                        "dev_trap_rate": best["rules"][rule]["trap_rate"],
                        "dev_unsteered_accuracy": rows[0]["rules"][rule]["accuracy"]}
    return {"n": len(encoded), "rows": rows, "chosen": chosen}


def _per_item(scores: Sequence[ItemScore]) -> list[dict[str, Any]]:
    rules = rules_of(scores)
    return [{"id": s.id, "length_group": s.length_group, "correct": {r: s.correct_by(r) for r in rules}}
            for s in scores]


def score_on_test(ev: HFEvaluator, encoded: Sequence[EncodedItem], neurons: Sequence[Pair], beta: float,
                  config: IRCANConfig, controls: bool = True, progress: bool = False) -> dict[str, Any]:
    """A set (``neurons`` x ``beta``) on test: beside unsteered, with paired tests and (if
    ``controls``) the config's random controls."""
    compared = compare_conditions(lambda enc, spec: ev.score(enc, spec, progress=progress), encoded,
                                  make_spec(_scale(neurons, beta)), {}, ev.shape,
                                  config.controls if controls else (), config.seeds)
    unsteered, steered = compared["unsteered"], compared["steered"]
    return {"n": len(encoded), "neurons": [list(p) for p in neurons], "beta": beta,
            "layers": layer_counts(neurons), "unsteered": summarize(unsteered), "set": summarize(steered),
            "mcnemar_set_vs_unsteered": compared["comparisons"], "controls": compared["controls"],
            "items": {"unsteered": _per_item(unsteered), "set": _per_item(steered)}}



def run(ev: HFEvaluator, data: ChoiceData, config: IRCANConfig, rules: Sequence[str] = RULES,
        progress: bool = True, checkpoints: Path | None = None) -> dict[str, Any]:
    """The whole protocol on one dataset; the result is JSON-ready."""
    started = time.perf_counter()
    results = localize(ev, data, config, progress, checkpoints)
    _, grid_items, test_items = data.splits(config)
    chosen_grid = grid(ev, results, ev.encode(grid_items), config)
    test_encoded = ev.encode(test_items)
    tests: dict[str, Any] = {}
    done: dict[tuple[int, float], dict[str, Any]] = {}
    # cells with controls first, so a cell chosen by several rules gets them
    for rule in sorted(rules, key=lambda r: r not in config.control_rules):
        cell = chosen_grid["chosen"][rule]
        key = (cell["h"], cell["beta"])
        if key not in done:
            done[key] = score_on_test(ev, test_encoded, ranked_neurons(results, config, cell["h"]), cell["beta"],
                                      config, controls=rule in config.control_rules)
        tests[rule] = {"h": cell["h"], "beta": cell["beta"], "result_of": f"h={key[0]} beta={key[1]}"}
    return {
        "protocol": "ircan", "dataset": data.describe(config), "model": ev.ref.name,
        "model_fingerprint": ev.ref.fingerprint, "config": config.model_dump(),
        "method": {"name": IRCAN.name, "params": config.method_params().model_dump(exclude={"count", "factor"})},
        "localization": {"examples": len(results),
                         "top_neurons": [list(p) for p in ranked_neurons(results, config, 50)]},
        "grid": chosen_grid, "chosen_by_rule": tests,
        "test": {f"h={h} beta={b}": r for (h, b), r in done.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def transfer(ev: HFEvaluator, source: dict[str, Any], rule: str, target: ChoiceData, config: IRCANConfig) -> dict[str, Any]:
    """The set that ``source`` (a :func:`run` result) chose under ``rule``, on ``target``'s test split
    (nothing is tuned on the target)."""
    cell = source["chosen_by_rule"][rule]
    chosen = source["test"][cell["result_of"]]
    _, _, test_items = target.splits(config)
    result = score_on_test(ev, ev.encode(test_items), [tuple(p) for p in chosen["neurons"]], chosen["beta"], config,
                           controls=rule in config.control_rules)
    return {"source": source["dataset"]["name"], "target": target.name, "rule": rule, "h": cell["h"],
            "beta": cell["beta"], **result}


def _tied(score: ItemScore, rule: str, tolerance: float = 1e-6) -> bool:
    """The rule's best score is shared by two choices (e.g. a COSE_KRE item listing one answer
    twice): which of them wins is decided by rounding, or by order."""
    values = sorted(score.scores(rule), reverse=True)
    return len(values) > 1 and values[0] - values[1] <= tolerance


def retest(ev: HFEvaluator, source: dict[str, Any], data: ChoiceData, config: IRCANConfig) -> dict[str, Any]:
    """``source`` (a :func:`run` result on ``data``) with every tested cell scored again under
    ``config``'s controls and seeds; localization and grid are kept as they were. The data files
    and the model must be the ones ``source`` used, and the unsteered and set conditions must give
    the result's per-item answers again (they do not depend on the controls), except on items
    whose best choices tie (listed under ``retest.changed_ties``): anything else is an error."""
    if source.get("protocol") != "ircan":
        raise KnSteerError("retest needs a result of the ircan protocol")
    if source["model_fingerprint"] != ev.ref.fingerprint:
        raise KnSteerError(f"the result was computed on model {source['model']} ({source['model_fingerprint']}), "
                           f"not on {ev.ref.name} ({ev.ref.fingerprint})")
    same = IRCANConfig(**{**source["config"], "seeds": config.seeds, "controls": config.controls,
                          "control_rules": config.control_rules})
    described = data.describe(same)
    for key in ("dev_sha256", "test_sha256", "test_split"):
        if described[key] != source["dataset"][key]:
            raise KnSteerError(f"{key} differs from the result's: {described[key]} vs {source['dataset'][key]}")
    _, _, test_items = data.splits(same)
    encoded = ev.encode(test_items)
    control_cells = {r["result_of"] for rule, r in source["chosen_by_rule"].items() if rule in same.control_rules}
    tests: dict[str, Any] = {}
    changed: dict[str, dict[str, list[str]]] = {}
    for key, old in source["test"].items():
        neurons = [tuple(p) for p in old["neurons"]]
        new = score_on_test(ev, encoded, neurons, old["beta"], same, controls=key in control_cells)
        for cond, spec in (("unsteered", None), ("set", _scale(neurons, old["beta"]))):
            moved = {o["id"] for o, n in zip(old["items"][cond], new["items"][cond]) if o != n}
            if not moved:
                continue
            scores = ev.score(encoded, spec_json(make_spec(spec)))  # cached by score_on_test
            tied = {s.id for s in scores if any(_tied(s, r) for r in rules_of(scores))}
            if moved - tied:
                raise KnSteerError(f"{key}: the {cond} condition does not reproduce the result's per-item answers "
                                   f"(items {', '.join(sorted(moved - tied)[:5])} changed without a tie)")
            changed.setdefault(key, {})[cond] = sorted(moved)
        tests[key] = new
    return {**source, "config": same.model_dump(), "test": tests, "retest": {"changed_ties": changed}}


def run_combined(ev: HFEvaluator, datasets: Sequence[ChoiceData], config: IRCANConfig,
                 rules: Sequence[str] = RULES, progress: bool = True, checkpoints: Path | None = None) -> dict[str, Any]:
    """One set localized over every dataset's localization split (the union of their per-example
    results), its cell chosen on the pooled grid items, tested on each dataset's test split."""
    results = [r for data in datasets for r in localize(ev, data, config, progress, checkpoints)]
    grid_encoded = [e for data in datasets for e in ev.encode(data.splits(config)[1])]
    chosen_grid = grid(ev, results, grid_encoded, config)
    tests: dict[str, Any] = {}
    for rule in rules:
        cell = chosen_grid["chosen"][rule]
        neurons = ranked_neurons(results, config, cell["h"])
        tests[rule] = {"h": cell["h"], "beta": cell["beta"],
                       "per_dataset": {data.name: score_on_test(ev, ev.encode(data.splits(config)[2]), neurons,
                                                                cell["beta"], config,
                                                                controls=rule in config.control_rules)
                                       for data in datasets}}
    return {"protocol": "ircan-combined", "datasets": [d.describe(config) for d in datasets],
            "model": ev.ref.name, "model_fingerprint": ev.ref.fingerprint, "config": config.model_dump(),
            "localization": {"examples": len(results)}, "grid": chosen_grid, "chosen_by_rule": tests}


def headline(test: dict[str, Any], rule: str) -> dict[str, Any]:
    """One rule's numbers of a :func:`score_on_test` result, for tables and set descriptions."""
    out: dict[str, Any] = {"unsteered": test["unsteered"]["rules"][rule], "set": test["set"]["rules"][rule],
                           "mcnemar": test["mcnemar_set_vs_unsteered"][rule]}
    for kind, by_rule in test["controls"].items():
        out[kind] = {"accuracy": by_rule[rule]["accuracy"], "trap_rate": by_rule[rule]["trap_rate"],
                     "p_vs_unsteered": by_rule[rule]["p_vs_unsteered"],
                     "p_set_vs_control": by_rule[rule]["p_set_vs_control"]}
    return out


def build_set(ev: HFEvaluator, data: ChoiceData, config: IRCANConfig, h: int, beta: float, out: Path, *,
              name: str, description: str, metrics: dict[str, Any], command_data: str | None = None,
              command_out: str | None = None, checkpoints: Path | None = None) -> NeuronSet:
    """Write the set of cell (h, beta) through the library's ``ircan`` method and runner, from the
    checkpointed per-example results; ``provenance.command`` is the ``kn-steer localize ircan``
    invocation that recomputes it (``command_data`` / ``command_out``: the paths to print there)."""
    params = config.method_params(count=h, factor=beta)
    loc, _, _ = data.splits(config)
    command = localize_command(IRCAN.name, params, command_data or str(data.dev), data.format,
                               command_out or str(out), limit=len(loc), name=name, model=model_argument(ev.ref))
    return run_localization(
        IRCAN, params, examples_from_items(loc), ev.model, ev.tokenizer, ev.ref, out,
        RunInfo(name=name, data_file=command_data or str(data.dev), description=description, command=command,
                metrics=metrics, data_sha256=content_sha256(data.dev)),
        progress=False, checkpoint=localization_checkpoint(data, config.method_params(), ev.ref.fingerprint, checkpoints),
    )


__all__ = ["ChoiceData", "IRCANConfig", "build_set", "grid", "headline", "localize", "localization_checkpoint",
           "ranked_neurons", "retest", "run", "run_combined", "score_on_test", "transfer"]
