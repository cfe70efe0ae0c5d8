"""Query localization (Chen et al.): do a fact's knowledge neurons follow the fact or the query?

1. **Facts**: PARAREL facts of relations with at least ``loc_queries + held_out`` usable
   templates, each with that many paraphrases; known when the greedy next token is the object's
   first token for at least half of them (the knowledge protocol's screen). The first ``facts``
   are taken round-robin over the relations.
2. **Attribution per query** with the library's ``kn-consistent`` method (integrated gradients per
   paraphrase, checkpointed); each query's coarse set is Dai et al.'s (above ``threshold`` x max).
3. **Consistency**: a fact's consistency score is the mean Jaccard similarity of its queries'
   coarse sets (our definition; the paper's abstract gives none). Beside it, two references from
   the same relation: the same template filled with another fact's subject, and another template
   with another subject. If same-template pairs overlap more than same-fact pairs, localization
   follows the query. Facts are split into consistent (K_C) and inconsistent (K_I) knowledge by
   Otsu's threshold on the scores (the paper's split uses Otsu's threshold; on what, exactly, its
   abstract does not say).
4. **Modification**: per fact, neurons are localized on the first ``loc_queries`` paraphrases only,
   by Dai et al.'s rule (``p``) and by the consistency-aware rule (``spread``), suppressed
   (x ``suppress_factor``), and the relative change of P(correct first token) is measured on the
   ``held_out`` paraphrases never used to localize (and on the localization ones), against random
   neurons with the same per-layer counts (``matched``) and uniform ones, ``seeds`` seeds each.
   Paired Wilcoxon tests over facts: each rule against its controls, and the two rules together.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from kn_steer.data.pararel import load_pararel
from kn_steer.errors import KnSteerError
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.controls import control_neurons, layer_counts
from kn_steer.eval.protocols.knowledge import KnowledgeConfig, KnowledgeProtocol
from kn_steer.localize.methods.kn import KNExample
from kn_steer.localize.methods.kn_consistent import (
    KN_CONSISTENT,
    KNConsistentParams,
    QueryTable,
    consistent_neurons,
    shared_neurons,
    table_of,
)
from kn_steer.stats import compare_paired_signed_rank

Pair = tuple[int, int]
#: PARAREL relations with at least six usable templates
QL_RELATIONS = ["P36", "P1376", "P27", "P176", "P178", "P159", "P495", "P740", "P106", "P39", "P19", "P20"]
RULES = ("plain", "consistent")


class QueryLocalizationConfig(KnowledgeConfig):
    relations: list[str] = Field(default_factory=lambda: list(QL_RELATIONS))
    facts: int = Field(100, ge=1)
    loc_queries: int = Field(3, ge=1, description="paraphrases used to localize")
    held_out: int = Field(3, ge=1, description="paraphrases never used to localize, where effects are measured")
    spread: float = Field(1.0, ge=0, description="consistency-aware rule: mean - spread x sd > threshold")
    paraphrases: int = Field(0, ge=0, description="(set from loc_queries + held_out)")

    def model_post_init(self, _: Any) -> None:
        self.paraphrases = self.loc_queries + self.held_out

    def table_params(self) -> KNConsistentParams:
        return KNConsistentParams(steps=self.steps, threshold=self.threshold, spread=self.spread)


def jaccard(a: set[Pair], b: set[Pair]) -> float | None:
    return len(a & b) / len(a | b) if a | b else None


def otsu_threshold(values: Sequence[float]) -> float:
    """The split of ``values`` into two groups with the largest between-group variance (Otsu's
    method on the exact values, no histogram): the returned cut is the midpoint of the best gap."""
    x = np.sort(np.asarray(values, float))
    if x.size < 2 or x[0] == x[-1]:
        return float(x[0]) if x.size else float("nan")
    best, cut = -1.0, float(x[0])
    for k in range(1, x.size):
        if x[k] == x[k - 1]:
            continue
        low, high = x[:k], x[k:]
        between = low.size * high.size / x.size ** 2 * (low.mean() - high.mean()) ** 2
        if between > best:
            best, cut = between, float((x[k - 1] + x[k]) / 2)
    return cut


def relative_change(after: Sequence[float], base: Sequence[float], queries: Sequence[int]) -> float:
    """Mean relative change of P(target) over the chosen prompts."""
    return statistics.mean((after[q] - base[q]) / base[q] for q in queries)


def _mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


class QueryLocalizationProtocol(KnowledgeProtocol):
    config: QueryLocalizationConfig

    def known_facts(self) -> tuple[list[KNExample], dict[str, int]]:
        relations = load_pararel(self.folder, self.config.relations)
        short = [r for r in self.config.relations if len(relations[r].prefixes) < self.config.paraphrases]
        if short:
            raise KnSteerError(f"relations with fewer than {self.config.paraphrases} usable templates: {', '.join(short)}")
        return super().known_facts()

    def templates(self, facts: Sequence[KNExample]) -> list[list[int]]:
        """Which template of its relation each of a fact's prompts is."""
        relations = load_pararel(self.folder, sorted({f.meta["relation"] for f in facts}))
        out = []
        for fact in facts:
            relation = relations[fact.meta["relation"]]
            subject = next(f for f in relation.facts if f.subject == fact.meta["subject"])
            filled = relation.prompts_for(subject).prompts
            out.append([filled.index(p) for p in fact.prompts])
        return out

    def tables(self, facts: Sequence[KNExample]) -> list[QueryTable]:
        return [table_of(r) for r in self.score_facts(KN_CONSISTENT, self.config.table_params(), facts)]

    def consistency(self, facts: Sequence[KNExample], tables: Sequence[QueryTable]) -> dict[str, Any]:
        templates = self.templates(facts)
        coarse = [[t.coarse(q) for q in range(len(f.prompts))] for f, t in zip(facts, tables)]
        per_fact = []
        for sets in coarse:
            pairs = [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]
            per_fact.append(_mean_or_none([p for p in pairs if p is not None]))
        same_template, other = [], []
        for i, j in itertools.combinations(range(len(facts)), 2):
            if facts[i].meta["relation"] != facts[j].meta["relation"]:
                continue
            for qi, ti in enumerate(templates[i]):
                for qj, tj in enumerate(templates[j]):
                    value = jaccard(coarse[i][qi], coarse[j][qj])
                    if value is not None:
                        (same_template if ti == tj else other).append(value)
        scores = [s for s in per_fact if s is not None]
        cut = otsu_threshold(scores)
        same_fact = [p for sets in coarse for a, b in itertools.combinations(sets, 2) if (p := jaccard(a, b)) is not None]
        return {
            "per_fact": per_fact, "otsu_threshold": cut,
            "consistent_facts": sum(1 for s in scores if s > cut), "inconsistent_facts": sum(1 for s in scores if s <= cut),
            "mean_coarse_size": statistics.mean(len(s) for sets in coarse for s in sets),
            "jaccard": {"same_fact_other_template": _summary(same_fact),
                        "other_fact_same_template": _summary(same_template),
                        "other_fact_other_template": _summary(other)},
            "p_same_template_vs_same_fact": _mannwhitney(same_template, same_fact),
        }

    def suppression(self, fact: KNExample, neurons: Sequence[Pair]) -> dict[str, Any]:
        """P(target) on every prompt: unsteered, with ``neurons`` suppressed, and with the controls."""
        cfg = self.config
        key = self._key("ql-suppress", fact=[fact.id, fact.prompts, fact.target], neurons=sorted(map(list, neurons)),
                        seeds=cfg.seeds, controls=cfg.controls, factor=cfg.suppress_factor)

        def compute() -> dict[str, Any]:
            out: dict[str, Any] = {"base": self._probs(fact, [], None),
                                   "set": self._probs(fact, neurons, cfg.suppress_factor)}
            for kind in cfg.controls:
                out[kind] = [self._probs(fact, control_neurons(kind, neurons, self.shape, seed), cfg.suppress_factor)
                             for seed in range(cfg.seeds)]
            return out

        return self.cache.compute(key, compute)

    def modification(self, facts: Sequence[KNExample], tables: Sequence[QueryTable],
                     consistent: Sequence[bool | None]) -> list[dict[str, Any]]:
        cfg = self.config
        loc = range(cfg.loc_queries)
        rows = []
        for fact, table, is_consistent in zip(facts, tables, consistent):
            row: dict[str, Any] = {"id": fact.id, "relation": fact.meta["relation"], "consistent": is_consistent}
            chosen = {"plain": shared_neurons(table, loc, cfg.p),
                      "consistent": consistent_neurons(table, loc, cfg.spread)}
            for rule, neurons in chosen.items():
                pairs = [(n.layer, n.index) for n in neurons]
                row[f"{rule}_neurons"] = len(pairs)
                row[f"{rule}_layers"] = layer_counts(pairs)
                if not pairs:
                    continue
                eff = self.suppression(fact, pairs)
                base = eff["base"]
                for split, queries in (("held_out", range(cfg.loc_queries, cfg.paraphrases)), ("localized", loc)):
                    row[f"{rule}_{split}"] = relative_change(eff["set"], base, queries)
                    for kind in cfg.controls:
                        row[f"{rule}_{split}_{kind}"] = statistics.mean(relative_change(x, base, queries)
                                                                        for x in eff[kind])
            rows.append(row)
        return rows

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        facts, screened = self.known_facts()
        tables = self.tables(facts)
        consistency = self.consistency(facts, tables)
        cut = consistency["otsu_threshold"]
        labels = [None if s is None else s > cut for s in consistency["per_fact"]]
        rows = self.modification(facts, tables, labels)
        groups = {"all": rows, "consistent": [r for r in rows if r["consistent"]],
                  "inconsistent": [r for r in rows if r["consistent"] is False]}
        return {
            "protocol": "query-localization", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": cfg.model_dump(),
            "method": {"name": KN_CONSISTENT.name, "params": cfg.table_params().model_dump()},
            "screened_facts": screened,
            "known_facts": {r: sum(1 for f in facts if f.meta["relation"] == r) for r in cfg.relations},
            "consistency": consistency,
            "modification": {name: summarize_rules(group, cfg.controls) for name, group in groups.items()},
            "per_fact": [{**row, "consistency": s, "prompts": f.prompts} for row, s, f
                         in zip(rows, consistency["per_fact"], facts)],
            "seconds": round(time.perf_counter() - started, 1),
        }


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": _mean_or_none(values),
            "median": statistics.median(values) if values else None}


def _mannwhitney(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy import stats

    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue) if a and b else None


def summarize_rules(rows: Sequence[dict[str, Any]], controls: Sequence[str]) -> dict[str, Any]:
    """Per rule and split: mean/median relative change of the set and its controls, signed-rank
    tests of the set against each control, and the two rules against each other (facts where both
    found neurons)."""
    out: dict[str, Any] = {"facts": len(rows)}
    for rule in RULES:
        measured = [r for r in rows if f"{rule}_held_out" in r]
        entry: dict[str, Any] = {"facts_with_neurons": len(measured),
                                 "mean_neurons": _mean_or_none([r[f"{rule}_neurons"] for r in rows])}
        for split in ("held_out", "localized"):
            name = f"{rule}_{split}"
            if not measured:
                continue
            entry[split] = {"set": _summary([r[name] for r in measured])}
            for kind in controls:
                entry[split][kind] = _summary([r[f"{name}_{kind}"] for r in measured])
                entry[split][f"p_vs_{kind}"] = compare_paired_signed_rank(
                    [(r[name], r[f"{name}_{kind}"]) for r in measured]).p_value
        out[rule] = entry
    both = [r for r in rows if "plain_held_out" in r and "consistent_held_out" in r]
    out["consistent_vs_plain_held_out"] = {
        "facts": len(both),
        "p": compare_paired_signed_rank([(r["consistent_held_out"], r["plain_held_out"]) for r in both]).p_value
        if both else None,
        "median_difference": statistics.median(r["consistent_held_out"] - r["plain_held_out"] for r in both)
        if both else None,
    }
    return out


def protocol(model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: QueryLocalizationConfig,
             cache: ResultCache, checkpoints: Path | None = None, progress: bool = True) -> QueryLocalizationProtocol:
    return QueryLocalizationProtocol(model, tokenizer, ref, folder, config, cache, checkpoints, progress)


__all__ = ["QL_RELATIONS", "QueryLocalizationConfig", "QueryLocalizationProtocol", "jaccard", "otsu_threshold",
           "protocol", "summarize_rules"]
