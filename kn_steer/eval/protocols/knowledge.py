"""Knowledge neurons (Dai et al. 2022) as a protocol: suppress and enhance against random controls.

1. **Known facts**: PARAREL facts of the chosen relations in a stable hashed order (``scan`` per
   relation), each with ``paraphrases`` prompts; a fact is known when the greedy next token is the
   object's first token for at least half of its prompts. The first ``facts`` known facts are taken
   round-robin over the relations.
2. **Localize** each fact with the library's ``kn`` method (per-example results checkpointed).
3. **Effects** per fact with at least one neuron: the relative change of P(correct first token),
   averaged over the fact's prompts, when its neurons are scaled by ``suppress_factor`` (x0) and
   ``enhance_factor`` (x2), and the same for random neurons of the same count and dose, drawn with
   the fact's per-layer counts (``matched``) and uniformly, ``seeds`` seeds each. Facts are the
   units of the paired Wilcoxon signed-rank tests: knowledge neurons against each control (mean
   over seeds), and each control against no change.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kn_steer.data.pararel import load_pararel
from kn_steer.eval.cache import ResultCache, cache_key
from kn_steer.eval.controls import (
    CONTROL_KINDS,
    compiled_for,
    control_neurons,
    layer_counts,
)
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.eval.protocols.common import FolderProtocol
from kn_steer.localize.methods import Context, ExampleResult
from kn_steer.localize.methods.kn import KN, KNExample, KNParams, fact_examples
from kn_steer.localize.runner import checkpoint_header, score_examples
from kn_steer.models.checkpoints import cache_dir
from kn_steer.stats import compare_paired_signed_rank

Pair = tuple[int, int]
DEFAULT_RELATIONS = ["P36", "P1376", "P30", "P103", "P27", "P407", "P37", "P140"]


class KnowledgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relations: list[str] = Field(default_factory=lambda: list(DEFAULT_RELATIONS))
    facts: int = Field(200, ge=1, description="known facts to localize (round-robin over relations)")
    paraphrases: int = Field(3, ge=1, description="prompts per fact")
    scan: int = Field(400, ge=1, description="facts screened per relation")
    steps: int = Field(20, ge=1)
    threshold: float = Field(0.2, gt=0, le=1)
    p: float = Field(0.5, ge=0, lt=1)
    seeds: int = Field(5, ge=1)
    controls: list[str] = Field(default_factory=lambda: list(CONTROL_KINDS))
    suppress_factor: float = 0.0
    enhance_factor: float = 2.0

    def method_params(self) -> KNParams:
        return KNParams(steps=self.steps, threshold=self.threshold, p=self.p)


class KnowledgeProtocol(FolderProtocol):
    def __init__(self, model: Any, tokenizer: Any, ref: Any, folder: str | Path, config: KnowledgeConfig,
                 cache: ResultCache, checkpoints: Path | None = None, progress: bool = True) -> None:
        super().__init__(model, tokenizer, ref, folder, cache, progress)
        self.config = config
        self.checkpoints = checkpoints if checkpoints is not None else cache_dir() / "localize"

    def _probs(self, example: KNExample, neurons: Sequence[Pair], factor: float | None) -> list[float]:
        compiled = None if factor is None else compiled_for(list(neurons), self.shape, "scale", factor=factor)
        return score_prompts(self.model, self.tokenizer, example.prompts, [example.target] * len(example.prompts),
                             compiled).prob.tolist()

    def candidates(self) -> list[KNExample]:
        """The facts to screen, each with ``meta.relation`` (PARAREL here; other fact sources override)."""
        cfg = self.config
        return fact_examples(load_pararel(self.folder, cfg.relations), cfg.relations, cfg.paraphrases, cfg.scan)

    def known_facts(self) -> tuple[list[KNExample], dict[str, int]]:
        cfg = self.config
        candidates = self.candidates()
        key = self._key("kn-screen", facts=[[e.id, e.prompts, e.target] for e in candidates])

        def screen() -> list[list[bool]]:
            prompts = [p for ex in candidates for p in ex.prompts]
            targets = [ex.target for ex in candidates for _ in ex.prompts]
            correct = score_prompts(self.model, self.tokenizer, prompts, targets).correct.tolist()
            out, k = [], 0
            for ex in candidates:
                out.append(correct[k:k + len(ex.prompts)])
                k += len(ex.prompts)
            return out

        hits = self.cache.compute(key, screen)
        by_relation: dict[str, list[KNExample]] = {r: [] for r in cfg.relations}
        for ex, hit in zip(candidates, hits):
            if sum(hit) * 2 >= len(hit):
                by_relation[ex.meta["relation"]].append(ex)
        known: list[KNExample] = []
        while len(known) < cfg.facts and any(by_relation.values()):
            for r in cfg.relations:
                if by_relation[r] and len(known) < cfg.facts:
                    known.append(by_relation[r].pop(0))
        screened = {r: sum(1 for ex in candidates if ex.meta["relation"] == r) for r in cfg.relations}
        return known, screened

    def localize(self, facts: Sequence[KNExample]) -> list[ExampleResult]:
        return self.score_facts(KN, self.config.method_params(), facts)

    def score_facts(self, method: Any, params: Any, facts: Sequence[KNExample]) -> list[ExampleResult]:
        """``method``'s per-fact results, checkpointed under the method, its per-example
        parameters, the model and the data."""
        header = cache_key(**checkpoint_header(method, params, self.ref.fingerprint))[:12]
        path = self.checkpoints / f"{method.name}-{self.folder_sha[:16]}-{header}.jsonl"
        ctx = Context(self.model, self.tokenizer, progress=self.progress)
        results, _ = score_examples(method, params, list(facts), ctx, self.ref.fingerprint, path, str(self.folder))
        return results

    def effects(self, fact: KNExample, neurons: Sequence[Pair]) -> dict[str, Any]:
        """Probabilities of the target per prompt: unsteered, and per dose for the set and controls."""
        cfg = self.config
        key = self._key("kn-effects", fact=[fact.id, fact.prompts, fact.target], neurons=sorted(map(list, neurons)),
                        seeds=cfg.seeds, controls=cfg.controls, doses=[cfg.suppress_factor, cfg.enhance_factor])

        def compute() -> dict[str, Any]:
            out: dict[str, Any] = {"base": self._probs(fact, [], None)}
            for dose, factor in (("suppress", cfg.suppress_factor), ("enhance", cfg.enhance_factor)):
                out[dose] = self._probs(fact, neurons, factor)
                for kind in cfg.controls:
                    out[f"{kind}_{dose}"] = [
                        self._probs(fact, control_neurons(kind, neurons, self.shape, seed), factor)
                        for seed in range(cfg.seeds)]
            return out

        return self.cache.compute(key, compute)

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        known, screened = self.known_facts()
        results = self.localize(known)
        per_fact = []
        layers: dict[int, int] = {}
        for ex, result in zip(known, results):
            neurons = [(n.layer, n.index) for n in result.neurons]
            for layer, count in layer_counts(neurons).items():
                layers[layer] = layers.get(layer, 0) + count
            if not neurons:
                continue
            eff = self.effects(ex, neurons)

            def change(after: Sequence[float]) -> float:
                return statistics.mean((a - b) / b for a, b in zip(after, eff["base"]))

            row = {"id": ex.id, "relation": ex.meta["relation"], "neurons": len(neurons),
                   "layers": layer_counts(neurons), "base_prob": statistics.mean(eff["base"])}
            for dose in ("suppress", "enhance"):
                row[dose] = change(eff[dose])
                for kind in cfg.controls:
                    row[f"{kind}_{dose}"] = statistics.mean(change(x) for x in eff[f"{kind}_{dose}"])
            per_fact.append(row)
        return {
            "protocol": "knowledge", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": cfg.model_dump(),
            "method": {"name": KN.name, "params": cfg.method_params().model_dump()},
            "screened_facts": screened,
            "known_facts": {r: sum(1 for ex in known if ex.meta["relation"] == r) for r in cfg.relations},
            "localized_facts": len(results), "facts_without_neurons": sum(1 for r in results if not r.neurons),
            "neurons_per_layer": dict(sorted(layers.items())),
            "overall": summarize_effects(per_fact, cfg.controls),
            "by_relation": {r: summarize_effects([x for x in per_fact if x["relation"] == r], cfg.controls)
                            for r in cfg.relations},
            "per_fact": per_fact, "seconds": round(time.perf_counter() - started, 1),
        }


def summarize_effects(rows: Sequence[dict[str, Any]], controls: Sequence[str]) -> dict[str, Any]:
    """Mean and median relative change per condition, and the paired signed-rank tests."""
    out: dict[str, Any] = {"facts": len(rows)}
    if not rows:
        return out
    out["mean_neurons"] = statistics.mean(r["neurons"] for r in rows)
    for dose in ("suppress", "enhance"):
        for name in [dose] + [f"{kind}_{dose}" for kind in controls]:
            values = [r[name] for r in rows]
            out[name] = {"mean": statistics.mean(values), "median": statistics.median(values)}
        for kind in controls:
            vs = compare_paired_signed_rank([(r[dose], r[f"{kind}_{dose}"]) for r in rows])
            zero = compare_paired_signed_rank([(r[f"{kind}_{dose}"], 0.0) for r in rows])
            out[f"p_{dose}_vs_{kind}"] = vs.p_value
            out[f"p_{kind}_{dose}_vs_unsteered"] = zero.p_value
        out[f"p_{dose}_vs_unsteered"] = compare_paired_signed_rank([(r[dose], 0.0) for r in rows]).p_value
    return out
