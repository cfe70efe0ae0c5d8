"""Degenerate knowledge neurons (after Chen et al., "Journey to the center of the knowledge neurons"
and "Cracking factual knowledge"): groups of a fact's knowledge neurons that each hold the fact, so
that suppressing one group leaves it and suppressing all removes it.

On the knowledge-neuron protocol's known facts and per-fact ``kn`` sets
(:mod:`kn_steer.eval.protocols.knowledge`; both cached), for every fact with at least two neurons:

1. **Structure, from the weights**: the fact's neurons split in two by average-linkage clustering
   of their write directions (the output projection's column each adds to the residual stream;
   cosine distance).
2. **Function, from ablations**: P(answer) averaged over the fact's prompts, unsteered and with each
   group, then both, scaled by ``suppress_factor`` (x0). ``drop(x) = 1 - P_x / P_base``. The fact
   has **degenerate** neurons when both together remove at least half of P (``drop_all >= 0.5``)
   while each group alone removes less than half. ``complementarity = 1 - max(drop_A, drop_B) /
   drop_all`` says how much of the effect needs the whole set (0: one group does it all).
   Controls: ``seeds`` random splits of the same neurons into groups of the same sizes (does the
   weight structure find the degeneracy, or would any split?), and random neurons with the set's
   per-layer counts for ``drop_all``.
3. **Use, telling true facts from corrupted ones**: each prompt completed by its answer and by
   another fact's answer of the same relation; the set's mean activation at the last token of
   each. A fact counts as told apart when the true completion activates its neurons more (mean
   over prompts); against matched random neurons, for facts with and without degenerate neurons.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from kn_steer.eval.controls import control_neurons
from kn_steer.eval.protocols.knowledge import KnowledgeConfig, KnowledgeProtocol
from kn_steer.localize.methods.kn import KNExample
from kn_steer.localize.recorder import last_token_activations
from kn_steer.models.sites import write_vectors
from kn_steer.stats import compare_paired_binary, compare_paired_signed_rank

Pair = tuple[int, int]
DEGENERATE_DROP = 0.5  # fixed before any run: "removes the fact" = at least half of P(answer) gone


class DegenerateConfig(KnowledgeConfig):
    split_seeds: int = Field(5, ge=1, description="random splits per fact (the structure's control)")


def structural_split(directions: torch.Tensor) -> list[int]:
    """Group labels (0/1) of rows of ``directions`` [n, hidden], n >= 2: average-linkage clusters of
    cosine distance cut into two."""
    from scipy.cluster.hierarchy import fcluster, linkage

    unit = torch.nn.functional.normalize(directions.double(), dim=1).numpy()
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    condensed = distance[np.triu_indices(len(unit), 1)]
    labels = fcluster(linkage(condensed, method="average"), t=2, criterion="maxclust") - 1
    if labels.max() == 0:  # identical directions: split off the last one
        labels[-1] = 1
    return labels.tolist()


def drops(base: float, after: Sequence[float]) -> list[float]:
    return [1.0 - a / base if base > 0 else 0.0 for a in after]


def degeneracy(drop_a: float, drop_b: float, drop_all: float) -> dict[str, Any]:
    degenerate = drop_all >= DEGENERATE_DROP and max(drop_a, drop_b) < DEGENERATE_DROP
    complementarity = 1.0 - max(drop_a, drop_b) / drop_all if drop_all > 0 else None
    return {"degenerate": degenerate, "complementarity": complementarity}


class DegenerateProtocol(KnowledgeProtocol):
    """See the module docstring."""

    config: DegenerateConfig

    def _p(self, fact: KNExample, neurons: Sequence[Pair]) -> float:
        return statistics.mean(self._probs(fact, neurons, self.config.suppress_factor if neurons else None))

    def split(self, neurons: Sequence[Pair]) -> list[int]:
        rows = torch.stack([write_vectors(self.model, layer)[index] for layer, index in neurons])
        return structural_split(rows)

    def ablations(self, fact: KNExample, neurons: Sequence[Pair]) -> dict[str, Any]:
        cfg = self.config
        labels = self.split(neurons)
        key = self._key("kn-degenerate", fact=[fact.id, fact.prompts, fact.target], neurons=[list(n) for n in neurons],
                        labels=labels, seeds=[cfg.seeds, cfg.split_seeds], factor=cfg.suppress_factor)

        def compute() -> dict[str, Any]:
            groups = [[n for n, g in zip(neurons, labels) if g == k] for k in (0, 1)]
            out: dict[str, Any] = {"labels": labels, "base": self._p(fact, []), "all": self._p(fact, neurons),
                                   "a": self._p(fact, groups[0]), "b": self._p(fact, groups[1])}
            splits = []
            for seed in range(cfg.split_seeds):
                rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{fact.id}:{seed}".encode()).digest()[:4], "little"))
                order = rng.permutation(len(neurons))
                first = [neurons[i] for i in order[: len(groups[0])]]
                rest = [neurons[i] for i in order[len(groups[0]):]]
                splits.append([self._p(fact, first), self._p(fact, rest)])
            out["random_splits"] = splits
            out["matched_all"] = [self._p(fact, control_neurons("matched", neurons, self.shape, s)) for s in range(cfg.seeds)]
            return out

        return self.cache.compute(key, compute)

    def fact_check(self, facts: Sequence[KNExample], sets: Sequence[Sequence[Pair]]) -> list[dict[str, Any]]:
        """Per fact: the margin (true minus corrupted completion) of the set's mean activation at the
        last token, averaged over the fact's prompts; and the same for matched random sets."""
        corrupt = corrupted_targets(facts)
        texts = [p + t for f, c in zip(facts, corrupt) for p in f.prompts for t in (f.target, c)]
        key = self._key("kn-factcheck", texts=texts, sets=[[list(n) for n in ns] for ns in sets], seeds=self.config.seeds)

        def compute() -> list[dict[str, Any]]:
            acts = last_token_activations(self.model, self.tokenizer, texts).reshape(
                len(texts), self.shape.num_layers, self.shape.intermediate_size)
            out, k = [], 0
            for fact, neurons in zip(facts, sets):
                rows = acts[k:k + 2 * len(fact.prompts)]
                k += 2 * len(fact.prompts)

                def margin(ns: Sequence[Pair]) -> float:
                    layers, idx = zip(*ns)
                    vals = rows[:, list(layers), list(idx)].mean(1)  # [2 * prompts]: true, corrupted, ...
                    return float((vals[0::2] - vals[1::2]).mean())

                out.append({"set": margin(neurons), "matched": [
                    margin(control_neurons("matched", neurons, self.shape, s)) for s in range(self.config.seeds)]})
            return out

        return self.cache.compute(key, compute)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        known, screened = self.known_facts()
        results = self.localize(known)
        pairs = [(f, [(n.layer, n.index) for n in r.neurons]) for f, r in zip(known, results)]
        usable = [(f, ns) for f, ns in pairs if len(ns) >= 2]
        rows = []
        for fact, neurons in tqdm(usable, desc="degenerate ablations", unit="fact", disable=not self.progress):
            ab = self.ablations(fact, neurons)
            d_a, d_b, d_all = drops(ab["base"], [ab["a"], ab["b"], ab["all"]])
            row = {"id": fact.id, "relation": fact.meta["relation"], "neurons": len(neurons),
                   "group_sizes": [ab["labels"].count(0), ab["labels"].count(1)],
                   "base": ab["base"], "drop_a": d_a, "drop_b": d_b, "drop_all": d_all, **degeneracy(d_a, d_b, d_all),
                   "drop_matched_all": statistics.mean(drops(ab["base"], ab["matched_all"]))}
            randoms = [degeneracy(*drops(ab["base"], [x, y]), d_all) for x, y in ab["random_splits"]]
            row["random_split_degenerate"] = statistics.mean(float(r["degenerate"]) for r in randoms)
            comps = [r["complementarity"] for r in randoms if r["complementarity"] is not None]
            row["random_split_complementarity"] = statistics.mean(comps) if comps else None
            rows.append(row)
        checks = self.fact_check([f for f, _ in usable], [ns for _, ns in usable])
        for row, check in zip(rows, checks):
            row["factcheck_margin"] = check["set"]
            row["factcheck_margin_matched"] = statistics.mean(check["matched"])
        return {
            "protocol": "degenerate-knowledge-neurons", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": self.config.model_dump(),
            "screened_facts": screened, "known_facts": len(known),
            "facts_by_neurons": {"none": sum(1 for _, ns in pairs if not ns), "one": sum(1 for _, ns in pairs if len(ns) == 1),
                                 "two_or_more": len(usable)},
            "overall": summarize(rows), "per_fact": rows, "seconds": round(time.perf_counter() - started, 1),
        }


def corrupted_targets(facts: Sequence[KNExample]) -> list[str]:
    """For each fact, another fact's answer of the same relation (the next different one, in order)."""
    by_relation: dict[str, list[str]] = {}
    for f in facts:
        by_relation.setdefault(f.meta["relation"], []).append(f.target)
    out = []
    for f in facts:
        options = [t for t in dict.fromkeys(by_relation[f.meta["relation"]]) if t != f.target]
        if not options:
            options = [t for f2 in facts for t in [f2.target] if t != f.target]
        digest = int.from_bytes(hashlib.sha256(f"corrupt:{f.id}".encode()).digest()[:4], "little")
        out.append(options[digest % len(options)])
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"facts": len(rows)}
    if not rows:
        return out
    removed = [r for r in rows if r["drop_all"] >= DEGENERATE_DROP]
    out["removed_by_whole_set"] = len(removed)
    out["degenerate"] = sum(r["degenerate"] for r in rows)
    out["degenerate_share_of_removed"] = out["degenerate"] / len(removed) if removed else None
    out["random_split_degenerate"] = statistics.mean(r["random_split_degenerate"] for r in rows)
    out["p_structure_vs_random_split"] = compare_paired_signed_rank(
        [(float(r["degenerate"]), r["random_split_degenerate"]) for r in rows]).p_value
    comp = [r for r in removed if r["complementarity"] is not None and r["random_split_complementarity"] is not None]
    if comp:
        out["complementarity"] = statistics.mean(r["complementarity"] for r in comp)
        out["random_split_complementarity"] = statistics.mean(r["random_split_complementarity"] for r in comp)
        out["p_complementarity_vs_random_split"] = compare_paired_signed_rank(
            [(r["complementarity"], r["random_split_complementarity"]) for r in comp]).p_value
    out["drop_all"] = statistics.mean(r["drop_all"] for r in rows)
    out["drop_matched_all"] = statistics.mean(r["drop_matched_all"] for r in rows)
    out["p_drop_all_vs_matched"] = compare_paired_signed_rank([(r["drop_all"], r["drop_matched_all"]) for r in rows]).p_value
    for name, subset in (("all", rows), ("degenerate", [r for r in rows if r["degenerate"]]),
                         ("other", [r for r in rows if not r["degenerate"]])):
        if not subset:
            continue
        out[f"factcheck_{name}"] = {
            "facts": len(subset),
            "told_apart": statistics.mean(float(r["factcheck_margin"] > 0) for r in subset),
            "told_apart_matched": statistics.mean(float(r["factcheck_margin_matched"] > 0) for r in subset),
            "p_vs_matched": compare_paired_binary([(r["factcheck_margin"] > 0, r["factcheck_margin_matched"] > 0)
                                                   for r in subset]).p_value,
        }
    return out
