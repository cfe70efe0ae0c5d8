"""Relation heads beside relation neurons (#17; "Does knowledge localization hold true? ... entity
and relation perspectives": relational knowledge is also stored in attention).

1. **Held-out prompts** as the relation protocol: the PARAREL test split, the prompts the
   unsteered model answers right (greedy first token); relations with at least ``min_known`` of
   them are evaluated (the first ``max_relations`` by known prompts).
2. **Heads** of each evaluated relation with the library's ``relation-heads`` method on the train
   split (each head zeroed alone; its drop of P(answer) on the relation minus on the others).
3. **Neurons** of each relation with the library's ``relation`` method (average precision).
4. **Accuracy** on the relation's own held-out prompts and on the other evaluated relations' with
   its top ``k`` heads zeroed, for each ``k`` in ``head_counts``; against random heads (``matched``:
   the same layers; ``uniform``), ``seeds`` each. Beside it, the relation's top ``k x head_dim``
   MLP neurons zeroed (the same number of units of the model zeroed) against matched random
   neurons. Paired tests over relations (few: read them as descriptive).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import Field

from kn_steer.eval.cache import ResultCache, content_key
from kn_steer.eval.controls import CONTROL_KINDS, control_heads, control_neurons
from kn_steer.eval.protocols.relation import RelationConfig, RelationProtocol
from kn_steer.localize.methods import Context
from kn_steer.localize.methods.base import CorpusStats
from kn_steer.localize.methods.relation_heads import (
    RELATION_HEADS,
    FactCorpus,
    RelationHeadsParams,
    head_ablation,
)
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.stats import compare_paired_signed_rank

Pair = tuple[int, int]


class RelationHeadsConfig(RelationConfig):
    head_counts: list[int] = Field(default_factory=lambda: [1, 3, 5], description="k: heads zeroed per relation")
    max_relations: int = Field(6, ge=1, description="evaluate the relations with the most known held-out prompts")
    max_prompts: int = Field(48, ge=1, description="relation-heads: right-answered train prompts per head")
    head_layers: list[int] | None = Field(None, description="relation-heads: search these layers only (None: all)")
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_KINDS))
    counts: list[int] = Field(default_factory=lambda: [1], description="(set from head_counts x head_dim)")

    def head_params(self, relation: str, count: int) -> RelationHeadsParams:
        return RelationHeadsParams(relation=relation, count=count, max_prompts=self.max_prompts, layers=self.head_layers,
                                   facts_per_relation=self.facts_per_relation, prompts_per_fact=self.prompts_per_fact)


class RelationHeadsProtocol(RelationProtocol):
    config: RelationHeadsConfig

    def __init__(self, model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: RelationHeadsConfig,
                 cache: ResultCache, progress: bool = True) -> None:
        super().__init__(model, tokenizer, ref, folder, config, cache, progress)
        if not self.shape.num_heads:
            raise ValueError("this model family does not declare its attention heads")
        # the neuron comparison zeroes as many units as the heads: k heads = k x head_dim neurons
        self.config = config.model_copy(update={"counts": [k * self.shape.head_dim for k in config.head_counts]})

    def head_scores(self, relation: str) -> CorpusStats:
        """The relation-heads method's scores for ``relation`` (cached)."""
        params = self.config.head_params(relation, max(self.config.head_counts))
        key = self._key("relation-heads", params=params.model_dump(), scan="until-found")

        def compute() -> dict[str, Any]:
            corpus = FactCorpus(prompts=[c.prompt for c in self.corpus], targets=[c.target for c in self.corpus],
                                relations=[c.relation for c in self.corpus], source=str(self.folder))
            stats = RELATION_HEADS.accumulate(Context(self.model, self.tokenizer, progress=self.progress), corpus, params)
            return {"scores": stats.scores.tolist(), "info": stats.info}

        value = self.cache.compute(key, compute)
        return CorpusStats(scores=torch.tensor(value["scores"]), info=value["info"])

    def top_heads(self, relation: str, count: int) -> list[Pair]:
        selection = RELATION_HEADS.select(self.head_scores(relation), self.config.head_params(relation, count))
        return [(h.layer, h.head) for h in selection.heads]

    def correct_heads(self, prompts: Sequence[Any], heads: Sequence[Pair]) -> str:
        """Per prompt, '1' when the greedy first token is the target's, with ``heads`` zeroed."""
        key = self._key("relation-heads-correct", prompts=content_key([[p.prompt, p.target] for p in prompts]),
                        heads=sorted([list(h) for h in heads]))

        def compute() -> str:
            scores = score_prompts(self.model, self.tokenizer, [p.prompt for p in prompts], [p.target for p in prompts],
                                   head_ablation(heads, self.shape) if heads else None)
            return "".join("1" if c else "0" for c in scores.correct.tolist())

        return self.cache.compute(key, compute)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        test = self.held_out()
        base = self.correct(test, [])
        known = [p for p, ok in zip(test, base) if ok == "1"]
        known_n = {r: sum(1 for p in known if p.relation == r) for r in self.relations}
        evaluated = sorted((r for r in self.relations if known_n[r] >= cfg.min_known), key=lambda r: -known_n[r])
        evaluated = evaluated[: cfg.max_relations]
        known = [p for p in known if p.relation in evaluated]
        neurons = self.top_neurons(evaluated)
        rows = []
        for relation in evaluated:
            own = [i for i, p in enumerate(known) if p.relation == relation]
            others = [i for i, p in enumerate(known) if p.relation != relation]

            def accuracy(bits: str) -> dict[str, float]:
                return {"own": sum(bits[i] == "1" for i in own) / len(own),
                        "others": sum(bits[i] == "1" for i in others) / max(len(others), 1)}

            for k in cfg.head_counts:
                heads = self.top_heads(relation, k)
                n_units = k * self.shape.head_dim
                mlp = [(l, i) for l, i, _ in neurons[relation][:n_units]]
                row: dict[str, Any] = {"relation": relation, "k": k, "units": n_units, "heads": heads,
                                       "known": len(own),
                                       "heads_set": accuracy(self.correct_heads(known, heads)),
                                       "neurons_set": accuracy(self.correct(known, mlp))}
                for kind in cfg.controls:
                    row[f"heads_{kind}"] = _mean_accuracy([accuracy(self.correct_heads(
                        known, control_heads(kind, heads, self.shape, seed))) for seed in range(cfg.seeds)])
                row["neurons_matched"] = _mean_accuracy([accuracy(self.correct(
                    known, control_neurons("matched", mlp, self.shape, seed))) for seed in range(cfg.seeds)])
                rows.append(row)
        return {
            "protocol": "relation-heads", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": cfg.model_dump(),
            "methods": {"heads": RELATION_HEADS.name, "neurons": "relation"},
            "shape": {"layers": self.shape.num_layers, "heads": self.shape.num_heads, "head_dim": self.shape.head_dim,
                      "neurons_per_layer": self.shape.intermediate_size},
            "known_prompts": {r: known_n[r] for r in evaluated},
            "head_scores": {r: {"top": self.top_heads(r, max(cfg.head_counts)),
                                "info": {k: v for k, v in self.head_scores(r).info.items() if not k.startswith("drop_")}}
                            for r in evaluated},
            "summary": summarize(rows, cfg.head_counts, cfg.controls),
            "rows": rows, "seconds": round(time.perf_counter() - started, 1),
        }


def _mean_accuracy(values: Sequence[dict[str, float]]) -> dict[str, float]:
    return {side: statistics.mean(v[side] for v in values) for side in ("own", "others")}


def summarize(rows: Sequence[dict[str, Any]], head_counts: Sequence[int], controls: Sequence[str]) -> dict[str, Any]:
    """Per k: mean accuracy over relations (own prompts and the others') for each condition, and
    signed-rank tests over relations of the set against its controls."""
    out: dict[str, Any] = {}
    conditions = ["heads_set", *(f"heads_{k}" for k in controls), "neurons_set", "neurons_matched"]
    for k in head_counts:
        part = [r for r in rows if r["k"] == k]
        if not part:
            continue
        entry: dict[str, Any] = {"relations": len(part)}
        for name in conditions:
            entry[name] = {side: statistics.mean(r[name][side] for r in part) for side in ("own", "others")}
        for name, against in [("heads_set", f"heads_{c}") for c in controls] + [("neurons_set", "neurons_matched"),
                                                                                ("heads_set", "neurons_set")]:
            pairs = [(r[name]["own"], r[against]["own"]) for r in part]
            entry[f"p_own_{name}_vs_{against}"] = compare_paired_signed_rank(pairs).p_value
        out[str(k)] = entry
    return out


def protocol(model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: RelationHeadsConfig,
             cache: ResultCache, progress: bool = True) -> RelationHeadsProtocol:
    return RelationHeadsProtocol(model, tokenizer, ref, folder, config, cache, progress)


__all__ = ["RelationHeadsConfig", "RelationHeadsProtocol", "protocol", "summarize"]
