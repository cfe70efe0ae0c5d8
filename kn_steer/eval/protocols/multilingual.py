"""Multilingual knowledge neurons (MATRICE, AMIG): language-agnostic neurons and cross-lingual transfer.

1. **Facts**: mLAMA facts aligned over ``languages`` (templates checked, :mod:`kn_steer.data.mlama`),
   ``scan`` per relation in a stable hashed order. A query is known when the greedy next token is
   the answer's first token; a fact is used when known in ``source`` and in at least
   ``min_languages`` languages in all, and keeps only its known languages. The first ``facts`` are
   taken round-robin over the relations.
2. **Attribution** of every query with the library's ``kn-multilingual`` method (checkpointed).
3. **Language-agnostic neurons** (AMIG): per fact, the neurons in the coarse set of every one of its
   languages; how many facts have them, how many, and at which layers against all coarse neurons.
4. **Cross-lingual transfer**: the source language's coarse set (Dai et al. on its one query) is
   suppressed (x ``suppress_factor``) and the relative change of P(answer's first token) is
   measured in every other language of the fact (queries never used to localize), against random
   neurons with the same per-layer counts (``matched``) and uniform ones, ``seeds`` each.
5. **Held-out language**: for each non-source language L of a fact, neurons localized *without* L
   by three rules: ``source`` (the source coarse set), ``mean`` (the method with equal weights and
   no spread, over the fact's other languages) and ``uncertainty`` (the method as configured:
   confidence weights, ``spread``), suppressed and measured on L against ``matched`` random.

Paired signed-rank tests over facts (or fact-language pairs). Languages whose answer starts with
the same token as the source's answer are reported apart: a neuron that promotes the token itself
"transfers" without holding anything language-independent.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kn_steer.data.mlama import DEFAULT_LANGUAGES, load_mlama
from kn_steer.errors import KnSteerError
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.controls import CONTROL_KINDS, compiled_for, control_neurons, layer_counts
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.eval.protocols.knowledge import KnowledgeProtocol
from kn_steer.eval.protocols.query_localization import relative_change
from kn_steer.localize.methods.kn_multilingual import (
    KN_MULTILINGUAL,
    LanguageQuery,
    LanguageTable,
    MultilingualExample,
    MultilingualParams,
    table_of,
    weighted_neurons,
)
from kn_steer.stats import compare_paired_signed_rank
from kn_steer.tokens import continuation_ids

Pair = tuple[int, int]
#: mLAMA relations whose English template ends in [Y] and whose objects a small model may know
ML_RELATIONS = ["P36", "P1376", "P37", "P103", "P364", "P19", "P20", "P30", "P17", "P495", "P740"]
RULES = ("source", "mean", "uncertainty")


class MultilingualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    languages: list[str] = Field(default_factory=lambda: list(DEFAULT_LANGUAGES))
    source: str = Field("en", description="the language whose neurons are tested in the others")
    relations: list[str] = Field(default_factory=lambda: list(ML_RELATIONS))
    facts: int = Field(60, ge=1, description="facts to localize (round-robin over relations)")
    min_languages: int = Field(3, ge=2, description="a fact must be known in this many languages, the source among them")
    scan: int = Field(150, ge=1, description="facts screened per relation")
    steps: int = Field(20, ge=1)
    threshold: float = Field(0.2, gt=0, le=1)
    spread: float = Field(1.0, ge=0)
    seeds: int = Field(5, ge=1)
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_KINDS))
    suppress_factor: float = 0.0

    @model_validator(mode="after")
    def _source_in_languages(self) -> "MultilingualConfig":
        if self.source not in self.languages:
            raise ValueError(f"source language {self.source!r} is not among languages {self.languages}")
        if self.min_languages > len(self.languages):
            raise ValueError(f"min_languages {self.min_languages} > {len(self.languages)} languages")
        return self

    def method_params(self) -> MultilingualParams:
        return MultilingualParams(steps=self.steps, threshold=self.threshold, spread=self.spread)


class MultilingualProtocol(KnowledgeProtocol):
    config: MultilingualConfig  # type: ignore[assignment]

    def known_facts(self) -> tuple[list[MultilingualExample], dict[str, Any]]:  # type: ignore[override]
        cfg = self.config
        data = load_mlama(self.folder, cfg.languages, cfg.relations)
        per_relation: dict[str, list] = {r: [] for r in cfg.relations}
        for fact in data.facts:
            if cfg.source in fact.queries and len(fact.queries) >= cfg.min_languages \
                    and len(per_relation[fact.relation]) < cfg.scan:
                per_relation[fact.relation].append(fact)
        candidates = [f for r in cfg.relations for f in per_relation[r]]
        # the source language first: the other languages of a fact unknown there are never asked
        source_known = self._screen([f.queries[cfg.source] for f in candidates])
        candidates = [f for f, hit in zip(candidates, source_known) if hit]
        queries = [q for f in candidates for lang, q in f.queries.items() if lang != cfg.source]
        hits = iter(self._screen(queries))
        by_relation: dict[str, list[MultilingualExample]] = {r: [] for r in cfg.relations}
        known_queries: dict[str, int] = {lang: 0 for lang in cfg.languages}
        known_queries[cfg.source] = len(candidates)
        for fact in candidates:
            known = [q for lang, q in fact.queries.items() if lang == cfg.source or next(hits)]
            for q in known:
                if q.lang != cfg.source:
                    known_queries[q.lang] += 1
            langs = {q.lang for q in known}
            if len(langs) >= cfg.min_languages:
                ordered = sorted(known, key=lambda q: cfg.languages.index(q.lang))
                by_relation[fact.relation].append(MultilingualExample(
                    id=fact.key, meta={"relation": fact.relation},
                    queries=[LanguageQuery(lang=q.lang, prompt=q.prompt, target=q.target) for q in ordered]))
        chosen: list[MultilingualExample] = []
        while len(chosen) < cfg.facts and any(by_relation.values()):
            for r in cfg.relations:
                if by_relation[r] and len(chosen) < cfg.facts:
                    chosen.append(by_relation[r].pop(0))
        asked = [f.queries[lang] for r in cfg.relations for f in per_relation[r] for lang in f.queries]
        screened = {"facts": {r: len(per_relation[r]) for r in cfg.relations},
                    "queries": {lang: sum(1 for q in asked if q.lang == lang) for lang in cfg.languages},
                    "known_in_source": len(candidates),
                    "known_queries": known_queries, "refused_templates": data.refused_templates}
        return chosen, screened

    def _screen(self, queries: Sequence[Any]) -> list[bool]:
        """Per query: is the greedy next token the answer's first token? (cached)"""
        key = self._key("mlama-screen", queries=[[q.lang, q.prompt, q.target] for q in queries])
        return self.cache.compute(key, lambda: score_prompts(
            self.model, self.tokenizer, [q.prompt for q in queries], [q.target for q in queries]).correct.tolist()
            if queries else [])

    def _query_probs(self, fact: MultilingualExample, neurons: Sequence[Pair] | None) -> list[float]:
        compiled = None if neurons is None else compiled_for(list(neurons), self.shape, "scale",
                                                             factor=self.config.suppress_factor)
        return score_prompts(self.model, self.tokenizer, [q.prompt for q in fact.queries],
                             [q.target for q in fact.queries], compiled).prob.tolist()

    def suppression(self, fact: MultilingualExample, neurons: Sequence[Pair], controls: Sequence[str]) -> dict[str, Any]:
        """P(answer) on every query of ``fact``: unsteered, ``neurons`` suppressed, and the controls."""
        cfg = self.config
        key = self._key("mlama-suppress", fact=[[q.lang, q.prompt, q.target] for q in fact.queries],
                        neurons=sorted(map(list, neurons)), seeds=cfg.seeds, controls=list(controls),
                        factor=cfg.suppress_factor)

        def compute() -> dict[str, Any]:
            out: dict[str, Any] = {"base": self._query_probs(fact, None), "set": self._query_probs(fact, neurons)}
            for kind in controls:
                out[kind] = [self._query_probs(fact, control_neurons(kind, neurons, self.shape, seed))
                             for seed in range(cfg.seeds)]
            return out

        return self.cache.compute(key, compute)

    def same_first_token(self, fact: MultilingualExample) -> list[bool]:
        """Per query: does its answer start with the same token as the source's answer?"""
        first = [continuation_ids(self.tokenizer, q.target)[0] for q in fact.queries]
        source = first[[q.lang for q in fact.queries].index(self.config.source)]
        return [t == source for t in first]

    def agnostic(self, tables: Sequence[LanguageTable]) -> dict[str, Any]:
        agnostic_layers: dict[int, int] = {}
        coarse_layers: dict[int, int] = {}
        per_fact = []
        for table in tables:
            found = table.agnostic()
            langs = list(dict.fromkeys(table.langs))
            coarse = [table.language_coarse(lang) for lang in langs]
            for layer, n in layer_counts(sorted(found)).items():
                agnostic_layers[layer] = agnostic_layers.get(layer, 0) + n
            for layer, n in layer_counts(sorted(set().union(*coarse))).items():
                coarse_layers[layer] = coarse_layers.get(layer, 0) + n
            per_fact.append({"languages": len(langs), "agnostic": len(found),
                             "mean_coarse": statistics.mean(len(c) for c in coarse),
                             "union_coarse": len(set().union(*coarse))})
        n = max(len(per_fact), 1)
        return {
            "facts": len(per_fact), "facts_with_agnostic": sum(1 for r in per_fact if r["agnostic"]),
            "share_with_agnostic": sum(1 for r in per_fact if r["agnostic"]) / n,
            "mean_agnostic": statistics.mean(r["agnostic"] for r in per_fact) if per_fact else None,
            "mean_coarse_per_language": statistics.mean(r["mean_coarse"] for r in per_fact) if per_fact else None,
            "agnostic_layers": dict(sorted(agnostic_layers.items())),
            "coarse_layers": dict(sorted(coarse_layers.items())),
            "per_fact": per_fact,
        }

    def transfer(self, facts: Sequence[MultilingualExample], tables: Sequence[LanguageTable]) -> list[dict[str, Any]]:
        cfg = self.config
        rows = []
        for fact, table in zip(facts, tables):
            langs = [q.lang for q in fact.queries]
            src = langs.index(cfg.source)
            neurons = sorted(table.coarse(src))
            if not neurons:
                continue
            eff = self.suppression(fact, neurons, cfg.controls)
            same = self.same_first_token(fact)
            row: dict[str, Any] = {"id": fact.id, "relation": fact.meta["relation"], "neurons": len(neurons),
                                   "layers": layer_counts(neurons), "source": relative_change(eff["set"], eff["base"], [src])}
            for kind in cfg.controls:
                row[f"source_{kind}"] = statistics.mean(relative_change(x, eff["base"], [src]) for x in eff[kind])
            row["languages"] = {}
            for q, lang in enumerate(langs):
                if q == src:
                    continue
                entry = {"set": relative_change(eff["set"], eff["base"], [q]), "same_first_token": same[q],
                         "base_prob": eff["base"][q]}
                for kind in cfg.controls:
                    entry[kind] = statistics.mean(relative_change(x, eff["base"], [q]) for x in eff[kind])
                row["languages"][lang] = entry
            rows.append(row)
        return rows

    def held_out(self, facts: Sequence[MultilingualExample], tables: Sequence[LanguageTable]) -> list[dict[str, Any]]:
        cfg = self.config
        rows = []
        for fact, table in zip(facts, tables):
            langs = [q.lang for q in fact.queries]
            same = self.same_first_token(fact)
            for q, lang in enumerate(langs):
                if lang == cfg.source:
                    continue
                others = [i for i, other in enumerate(langs) if other != lang]
                chosen = {"source": sorted(table.coarse(langs.index(cfg.source))),
                          "mean": [(n.layer, n.index) for n in weighted_neurons(table, others, 0.0, "uniform")],
                          "uncertainty": [(n.layer, n.index) for n in
                                          weighted_neurons(table, others, cfg.spread, "confidence")]}
                row: dict[str, Any] = {"id": fact.id, "relation": fact.meta["relation"], "lang": lang,
                                       "same_first_token": same[q]}
                for rule, neurons in chosen.items():
                    row[f"{rule}_neurons"] = len(neurons)
                    if not neurons:
                        continue
                    eff = self.suppression(fact, neurons, ["matched"])
                    row[rule] = relative_change(eff["set"], eff["base"], [q])
                    row[f"{rule}_matched"] = statistics.mean(relative_change(x, eff["base"], [q]) for x in eff["matched"])
                rows.append(row)
        return rows

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        facts, screened = self.known_facts()
        if not facts:
            raise KnSteerError(f"no fact is known in {cfg.source} and {cfg.min_languages - 1} other languages "
                               f"among {sum(screened['facts'].values())} screened")
        tables = [table_of(r) for r in self.score_facts(KN_MULTILINGUAL, cfg.method_params(), facts)]
        transfer = self.transfer(facts, tables)
        held = self.held_out(facts, tables)
        return {
            "protocol": "multilingual", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": cfg.model_dump(),
            "method": {"name": KN_MULTILINGUAL.name, "params": cfg.method_params().model_dump()},
            "screened": screened,
            "facts": {"used": len(facts), "by_relation": {r: sum(1 for f in facts if f.meta["relation"] == r)
                                                          for r in cfg.relations},
                      "by_language": {lang: sum(1 for f in facts if lang in f.languages) for lang in cfg.languages},
                      "mean_confidence": {lang: _mean([t.confidence[i] for t in tables
                                                       for i, x in enumerate(t.langs) if x == lang])
                                          for lang in cfg.languages}},
            "agnostic": self.agnostic(tables),
            "transfer": summarize_transfer(transfer, cfg.languages, cfg.source, cfg.controls),
            "held_out": summarize_held_out(held),
            "per_fact": [{"id": f.id, "queries": [q.model_dump() for q in f.queries]} for f in facts],
            "transfer_rows": transfer, "held_out_rows": held,
            "seconds": round(time.perf_counter() - started, 1),
        }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": _mean(values), "median": statistics.median(values) if values else None}


def _p(pairs: Sequence[tuple[float, float]]) -> float | None:
    return compare_paired_signed_rank(pairs).p_value if pairs else None


def _against_controls(entries: Sequence[dict[str, Any]], controls: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"set": _summary([e["set"] for e in entries])}
    for kind in controls:
        out[kind] = _summary([e[kind] for e in entries])
        out[f"p_vs_{kind}"] = _p([(e["set"], e[kind]) for e in entries])
    return out


def summarize_transfer(rows: Sequence[dict[str, Any]], languages: Sequence[str], source: str,
                       controls: Sequence[str]) -> dict[str, Any]:
    """Per language and over all non-source languages (one value per fact: its mean over them),
    the set's relative change against each control; the same split by shared first token."""
    out: dict[str, Any] = {"facts": len(rows),
                           "source_localized": _against_controls(
                               [{"set": r["source"], **{k: r[f"source_{k}"] for k in controls}} for r in rows], controls)}

    def per_fact(pick) -> list[dict[str, Any]]:
        entries = []
        for r in rows:
            chosen = [e for e in r["languages"].values() if pick(e)]
            if chosen:
                entries.append({name: statistics.mean(e[name] for e in chosen) for name in ("set", *controls)})
        return entries

    out["other_languages"] = _against_controls(per_fact(lambda e: True), controls)
    out["other_languages_different_first_token"] = _against_controls(per_fact(lambda e: not e["same_first_token"]),
                                                                     controls)
    out["other_languages_same_first_token"] = _against_controls(per_fact(lambda e: e["same_first_token"]), controls)
    out["by_language"] = {lang: _against_controls([r["languages"][lang] for r in rows if lang in r["languages"]], controls)
                          for lang in languages if lang != source}
    return out


def summarize_held_out(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per rule: the held-out language's relative change against matched random; the rules paired."""
    out: dict[str, Any] = {"pairs": len(rows)}
    for split, keep in (("all", lambda r: True), ("different_first_token", lambda r: not r["same_first_token"])):
        part = [r for r in rows if keep(r)]
        entry: dict[str, Any] = {"pairs": len(part)}
        for rule in RULES:
            measured = [r for r in part if rule in r]
            entry[rule] = {"pairs_with_neurons": len(measured),
                           "mean_neurons": _mean([r[f"{rule}_neurons"] for r in part]),
                           **_against_controls([{"set": r[rule], "matched": r[f"{rule}_matched"]} for r in measured],
                                               ["matched"])}
        for a, b in (("uncertainty", "mean"), ("uncertainty", "source"), ("mean", "source")):
            both = [r for r in part if a in r and b in r]
            entry[f"{a}_vs_{b}"] = {"pairs": len(both), "p": _p([(r[a], r[b]) for r in both]),
                                    "median_difference": statistics.median(r[a] - r[b] for r in both) if both else None}
        out[split] = entry
    return out


def protocol(model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: MultilingualConfig,
             cache: ResultCache, checkpoints: Path | None = None, progress: bool = True) -> MultilingualProtocol:
    return MultilingualProtocol(model, tokenizer, ref, folder, config, cache, checkpoints, progress)  # type: ignore[arg-type]


__all__ = ["ML_RELATIONS", "MultilingualConfig", "MultilingualProtocol", "RULES", "protocol",
           "summarize_held_out", "summarize_transfer"]
