"""Relation-specific neurons as a protocol: cumulativity over N and the full interference matrix.

1. **Localize** with the library's ``relation`` method on the PARAREL train split (one activation
   pass over every relation's prompts; each neuron's average precision for every relation at once).
2. **Known held-out prompts**: the test split's prompts (``test_facts`` facts x ``test_prompts``
   patterns per relation) that the unsteered model answers right (greedy first token). Every
   relation with at least ``min_known`` of them is *evaluated*.
3. **Interference matrix**, for each N: row = the relation whose top-N neurons are clamped to 0
   (every position; every evaluated relation, or the config's ``rows``), column = the evaluated
   relation whose known prompts are scored (always every one); cell =
   accuracy (1.0 unsteered by construction). Random rows: N neurons uniform over all layers, and
   per suppressed relation N neurons with its set's per-layer counts (``matched``; at the N of
   ``matched_counts`` for every row, and at ``matched_extra``), ``seeds`` seeds each. Per row: accuracy on its own relation, the worst off-target relation, and exact
   McNemar tests on the relation's own prompts (set vs unsteered, set vs each matched seed).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.pararel import LabelledPrompt, load_pararel, relation_prompts
from kn_steer.eval.cache import ResultCache, content_key
from kn_steer.eval.controls import (
    deactivation,
    layer_counts,
    matched_neurons,
    uniform_neurons,
)
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.eval.protocols.common import FolderProtocol
from kn_steer.localize.command import localize_command, model_argument
from kn_steer.localize.methods.relation import (
    RELATION,
    RelationCorpus,
    RelationParams,
    relation_scores,
)
from kn_steer.localize.ranking import top_flat
from kn_steer.localize.recorder import last_token_activations
from kn_steer.localize.runner import RunInfo, run_localization
from kn_steer.sets.format import NeuronSet
from kn_steer.stats import compare_paired_binary

Pair = tuple[int, int]


class RelationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    facts_per_relation: int = Field(20, ge=1, description="corpus: train facts per relation")
    prompts_per_fact: int = Field(3, ge=1, description="corpus: patterns per train fact")
    test_facts: int = Field(150, ge=1, description="held-out facts per relation")
    test_prompts: int = Field(2, ge=1, description="patterns per held-out fact")
    min_known: int = Field(10, ge=1, description="evaluate relations with at least this many known prompts")
    counts: list[int] = Field(default_factory=lambda: [10, 50, 100, 500, 1000], description="N values")
    matched_counts: list[int] = Field(default_factory=lambda: [100],
                                      description="N at which every row gets matched random rows")
    matched_extra: dict[str, list[int]] = Field(
        default_factory=dict, description="more (relation -> N) cells with matched random rows, e.g. shipped sets")
    rows: list[str] | None = Field(
        None, description="suppressed relations (matrix rows; None: every evaluated relation); columns are always "
                          "every evaluated relation")
    seeds: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="prompts per forward (activations)")

    def method_params(self, relation: str, count: int) -> RelationParams:
        return RelationParams(relation=relation, count=count, facts_per_relation=self.facts_per_relation,
                              prompts_per_fact=self.prompts_per_fact, batch_size=self.batch_size)


class RelationProtocol(FolderProtocol):
    """One model, one PARAREL folder, one config; every expensive step cached."""

    def __init__(self, model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: RelationConfig,
                 cache: ResultCache, progress: bool = True) -> None:
        super().__init__(model, tokenizer, ref, folder, cache, progress)
        self.config = config
        self.relations = load_pararel(self.folder)
        self.corpus = relation_prompts(self.relations, "train", config.facts_per_relation, config.prompts_per_fact)

    # -------------------------------------------------------------------------- localization

    def top_neurons(self, relations: Sequence[str]) -> dict[str, list[tuple[int, int, float]]]:
        """Per relation, the best ``max(counts)`` neurons by AP (one activation pass, cached)."""
        keep = max(self.config.counts)
        key = self._key("relation-top", corpus=[self.config.facts_per_relation, self.config.prompts_per_fact],
                        batch=self.config.batch_size, keep=keep, relations=sorted(relations))

        def compute() -> dict[str, list]:
            bar = None
            if self.progress:
                bar = tqdm(total=len(self.corpus), desc="relation activations", unit="prompt")
            acts = last_token_activations(self.model, self.tokenizer, [c.prompt for c in self.corpus],
                                          self.config.batch_size, progress=bar.update if bar else None)
            if bar is not None:
                bar.close()
            scores = relation_scores(acts, [c.relation for c in self.corpus], list(relations), self.shape)
            return {r: [list(t) for t in top_flat(scores[r], keep)] for r in relations}

        return {r: [tuple(x) for x in v] for r, v in self.cache.compute(key, compute).items()}

    # -------------------------------------------------------------------------- evaluation

    def held_out(self) -> list[LabelledPrompt]:
        return relation_prompts(self.relations, "test", self.config.test_facts, self.config.test_prompts)

    def correct(self, prompts: Sequence[LabelledPrompt], neurons: Sequence[Pair]) -> str:
        """Per prompt, '1' when the greedy first token is the target's, under ``neurons`` clamped to 0."""
        key = self._key("relation-correct", prompts=content_key([[p.prompt, p.target] for p in prompts]),
                        neurons=sorted([list(n) for n in neurons]))

        def compute() -> str:
            scores = score_prompts(self.model, self.tokenizer, [p.prompt for p in prompts],
                                   [p.target for p in prompts], deactivation(list(neurons), self.shape))
            return "".join("1" if c else "0" for c in scores.correct.tolist())

        return self.cache.compute(key, compute)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        test = self.held_out()
        base = self.correct(test, [])
        known = [p for p, ok in zip(test, base) if ok == "1"]
        per_relation = {r: sum(1 for p in test if p.relation == r) for r in self.relations}
        known_n = {r: sum(1 for p in known if p.relation == r) for r in self.relations}
        evaluated = [r for r in self.relations if known_n[r] >= cfg.min_known]
        known = [p for p in known if p.relation in evaluated]
        tops = self.top_neurons(sorted({c.relation for c in self.corpus}))
        rows_of = {r: [i for i, p in enumerate(known) if p.relation == r] for r in evaluated}

        def accuracy(bits: str) -> dict[str, float]:
            return {r: sum(bits[i] == "1" for i in idx) / len(idx) for r, idx in rows_of.items()}

        matrices: dict[str, Any] = {}
        suppressed = evaluated if cfg.rows is None else [r for r in cfg.rows if r in evaluated]
        for n in cfg.counts:
            uniform = [self.correct(known, uniform_neurons(n, self.shape, seed)) for seed in range(cfg.seeds)]
            rows = {}
            for r in suppressed:
                neurons = [(l, i) for l, i, _ in tops[r][:n]]
                bits = self.correct(known, neurons)
                row: dict[str, Any] = {"accuracy": accuracy(bits), "correct": bits, "ap_at_n": tops[r][n - 1][2],
                                       "layers": layer_counts(neurons)}
                own = rows_of[r]
                base_own = [True] * len(own)  # known prompts: all right unsteered
                row["p_vs_unsteered"] = compare_paired_binary(
                    list(zip([bits[i] == "1" for i in own], base_own))).p_value
                off = {c: a for c, a in row["accuracy"].items() if c != r}
                worst = min(off, key=off.get) if off else None
                row["worst_off_target"] = {"relation": worst, "accuracy": off[worst]} if worst else None
                row["mean_off_target"] = statistics.mean(off.values()) if off else None
                if n in cfg.matched_counts or n in cfg.matched_extra.get(r, []):
                    seeds = [self.correct(known, matched_neurons(neurons, self.shape, seed)) for seed in range(cfg.seeds)]
                    accs = [accuracy(b) for b in seeds]
                    row["matched"] = {
                        "accuracy": {c: statistics.mean(a[c] for a in accs) for c in evaluated},
                        "accuracy_sd": {c: statistics.stdev([a[c] for a in accs]) if len(accs) > 1 else 0.0
                                        for c in evaluated},
                        "p_vs_unsteered_on_relation": [compare_paired_binary(
                            list(zip([b[i] == "1" for i in own], base_own))).p_value for b in seeds],
                        "p_set_vs_control_on_relation": [compare_paired_binary(
                            list(zip([bits[i] == "1" for i in own], [b[i] == "1" for i in own]))).p_value
                            for b in seeds],
                    }
                rows[r] = row
            uaccs = [accuracy(b) for b in uniform]
            matrices[str(n)] = {
                "rows": rows,
                "uniform": {"accuracy": {c: statistics.mean(a[c] for a in uaccs) for c in evaluated},
                            "accuracy_sd": {c: statistics.stdev([a[c] for a in uaccs]) if len(uaccs) > 1 else 0.0
                                            for c in evaluated}},
            }
        return {
            "protocol": "relation", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": cfg.model_dump(),
            "corpus": {"prompts": len(self.corpus), "relations": len({c.relation for c in self.corpus})},
            "held_out_prompts": per_relation, "known_prompts": known_n, "evaluated": evaluated, "rows": suppressed,
            "baseline_accuracy_held_out": {r: known_n[r] / per_relation[r] for r in self.relations if per_relation[r]},
            "known_prompt_list": [[p.relation, p.prompt, p.target] for p in known],
            "matrices": matrices, "seconds": round(time.perf_counter() - started, 1),
        }

    # -------------------------------------------------------------------------- shipping

    def build_set(self, relation: str, count: int, out: Path, *, name: str, description: str,
                  metrics: dict[str, Any], command_data: str | None = None,
                  command_out: str | None = None) -> NeuronSet:
        """The set of ``relation``'s top ``count`` neurons, written by the library's ``relation``
        method (``provenance.command`` recomputes it)."""
        params = self.config.method_params(relation, count)
        corpus = RelationCorpus.of(self.corpus, str(self.folder))
        command = localize_command(RELATION.name, params, command_data or str(self.folder), "pararel",
                                   command_out or str(out), name=name, model=model_argument(self.ref))
        return run_localization(RELATION, params, corpus, self.model, self.tokenizer, self.ref, out,
                                RunInfo(name=name, data_file=command_data or str(self.folder), description=description,
                                        command=command, metrics=metrics, data_sha256=self.folder_sha),
                                progress=self.progress)

