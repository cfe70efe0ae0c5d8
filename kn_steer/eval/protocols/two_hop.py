"""Factual recall during reasoning: the first hop's knowledge neurons, steered while the model
answers a two-hop question (after "Unveiling factual recall behaviors"), against random controls.

1. **Chains** (:mod:`kn_steer.data.twohop`) whose two hops are next-token clozes and whose answer
   is not spelled in the subject, in a stable hashed order per relation pair (``scan`` per pair).
   A chain is kept when the model knows **both hops** (greedy next token = the bridge's first
   token after hop 1's cloze, the answer's after hop 2's); the first ``chains`` are taken
   round-robin over the pairs. Per pair, the first known chain is not evaluated: it is the
   worked example of the prompts.
2. **Localize** each kept chain's first hop (the fact ``e1 --r1--> e2``) with the ``kn`` method
   (integrated gradients on hop 1's cloze, target the bridge), per-chain results checkpointed.
3. **Answer** each two-hop question greedily, in one vLLM batch where every request carries its
   own intervention, with two prompts that share the pair's worked example:
   ``direct`` ("Question: Q what?\\nAnswer:") and ``cot`` (a reasoning line that states both hops,
   then the answer). Correct: the answer appears in the reply (direct: its first line; cot: up to
   the answer line). Also the log-probability of the answer after the direct prompt, and for
   ``cot`` whether the bridge is named.
4. **Conditions**: unsteered; the chain's hop-1 neurons scaled by ``suppress_factor`` (x0) and
   ``enhance_factor`` (x2) at every position; the same for ``seeds`` random sets with the set's
   per-layer counts (``matched``). Chains are the units of the tests: exact McNemar for the set
   against unsteered, paired signed-rank for the set against the mean of its controls.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.twohop import TwoHopChain, load_twohop
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.controls import control_neurons, layer_counts, neuron_spec
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.eval.protocols.knowledge import KnowledgeConfig, KnowledgeProtocol
from kn_steer.eval.vllm_backend import continuation_logprobs, generate
from kn_steer.localize.methods.kn import KN, KNExample
from kn_steer.stats import compare_paired_binary, compare_paired_signed_rank

Pair = tuple[int, int]
STYLES = ("direct", "cot")
DOSES = ("suppress", "enhance")


class TwoHopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[str] | None = Field(None, description="relation pairs 'r1-r2' (default: every pair with clozes)")
    scan: int = Field(80, ge=2, description="chains screened per pair")
    chains: int = Field(120, ge=1, description="known chains evaluated (round-robin over pairs)")
    steps: int = Field(20, ge=1)
    threshold: float = Field(0.2, gt=0, le=1)
    seeds: int = Field(5, ge=1)
    suppress_factor: float = 0.0
    enhance_factor: float = 2.0
    direct_tokens: int = Field(8, ge=1, description="tokens generated for a direct answer")
    cot_tokens: int = Field(48, ge=1, description="tokens generated for a reasoned answer")


def _order(chain: TwoHopChain) -> bytes:
    return hashlib.sha256(f"twohop:{chain.id}".encode()).digest()


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def prompt(style: str, chain: TwoHopChain, example: TwoHopChain) -> str:
    """The question after the pair's worked example (see the module docstring)."""
    question = f"Question: {example.twohop_prompt} what?\n"
    if style == "direct":
        shot = question + f"Answer: {example.answer}\n\n"
        return shot + f"Question: {chain.twohop_prompt} what?\nAnswer:"
    shot = (question + f"Reasoning: {example.hop1_prompt} {example.e2}. {example.hop2_prompt} {example.e3}.\n"
            f"Answer: {example.answer}\n\n")
    return shot + f"Question: {chain.twohop_prompt} what?\nReasoning:"


def judge(style: str, chain: TwoHopChain, reply: str) -> dict[str, bool]:
    """Whether the reply gives the answer (and, reasoning, names the bridge)."""
    if style == "direct":
        return {"correct": _norm(chain.answer) in _norm(reply.split("\n")[0])}
    head = reply.split("\n\n")[0]
    reasoning, _, answer = head.partition("Answer:")
    return {"correct": _norm(chain.answer) in _norm(answer or reasoning),
            "bridge": _norm(chain.e2) in _norm(reasoning)}


class TwoHopProtocol(KnowledgeProtocol):
    """Known chains, hop-1 knowledge neurons, answers under steering (module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, ref: Any, path: str | Path, config: TwoHopConfig,
                 cache: ResultCache, llm: Any, checkpoints: Path | None = None, progress: bool = True) -> None:
        kn = KnowledgeConfig(steps=config.steps, threshold=config.threshold, seeds=config.seeds, controls=["matched"],
                             suppress_factor=config.suppress_factor, enhance_factor=config.enhance_factor)
        super().__init__(model, tokenizer, ref, path, kn, cache, checkpoints, progress)
        self.two_hop = config
        self.llm = llm

    # ----- chains ---------------------------------------------------------------------------------
    def screened(self) -> tuple[dict[str, list[TwoHopChain]], dict[str, dict[str, int]]]:
        """Per pair, the scanned chains in order that the model knows both hops of, and counts."""
        cfg = self.two_hop
        usable = [c for c in load_twohop(self.folder) if c.prompt_ended and not c.shortcut]
        pairs = cfg.pairs or sorted({c.pair for c in usable})
        scanned = {p: sorted((c for c in usable if c.pair == p), key=_order)[:cfg.scan] for p in pairs}
        chains = [c for p in pairs for c in scanned[p]]
        key = self._key("twohop-screen", chains=[[c.id, c.hop1_prompt, c.e2, c.hop2_prompt, c.e3] for c in chains])

        def screen() -> list[list[bool]]:
            hop1 = score_prompts(self.model, self.tokenizer, [c.hop1_prompt for c in chains],
                                 [" " + c.e2 for c in chains]).correct.tolist()
            hop2 = score_prompts(self.model, self.tokenizer, [c.hop2_prompt for c in chains],
                                 [" " + c.e3 for c in chains]).correct.tolist()
            return [list(x) for x in zip(hop1, hop2)]

        hits = dict(zip((c.id for c in chains), self.cache.compute(key, screen)))
        known = {p: [c for c in scanned[p] if all(hits[c.id])] for p in pairs}
        counts = {p: {"scanned": len(scanned[p]), "hop1_known": sum(hits[c.id][0] for c in scanned[p]),
                      "hop2_known": sum(hits[c.id][1] for c in scanned[p]), "both_known": len(known[p])}
                  for p in pairs}
        return known, counts

    def select(self, known: dict[str, list[TwoHopChain]]) -> tuple[list[TwoHopChain], dict[str, TwoHopChain]]:
        """The evaluated chains (round-robin) and each pair's worked example (its first known chain)."""
        examples = {p: chains[0] for p, chains in known.items() if len(chains) >= 2}
        queues = {p: list(known[p][1:]) for p in examples}
        out: list[TwoHopChain] = []
        while len(out) < self.two_hop.chains and any(queues.values()):
            for p in queues:
                if queues[p] and len(out) < self.two_hop.chains:
                    out.append(queues[p].pop(0))
        return out, examples

    # ----- answers ------------------------------------------------------------------------------
    def conditions(self, neurons: Sequence[Pair]) -> list[tuple[str, int | None, Any]]:
        """(condition, seed, spec) for one chain: unsteered, the set and its controls at both doses."""
        cfg = self.two_hop
        out: list[tuple[str, int | None, Any]] = [("base", None, None)]
        for dose, factor in (("suppress", cfg.suppress_factor), ("enhance", cfg.enhance_factor)):
            out.append((dose, None, neuron_spec(list(neurons), "scale", factor)))
            for seed in range(cfg.seeds):
                out.append((f"matched_{dose}", seed,
                            neuron_spec(control_neurons("matched", neurons, self.shape, seed), "scale", factor)))
        return out

    def answers(self, chain: TwoHopChain, example: TwoHopChain, neurons: Sequence[Pair]) -> dict[str, Any]:
        cfg = self.two_hop
        conds = self.conditions(neurons)
        key = self._key("twohop-answers", chain=chain.model_dump(), example=example.id,
                        neurons=sorted(map(list, neurons)), seeds=cfg.seeds,
                        doses=[cfg.suppress_factor, cfg.enhance_factor],
                        tokens=[cfg.direct_tokens, cfg.cot_tokens])

        def compute() -> dict[str, Any]:
            specs = [spec for _, _, spec in conds]
            out: dict[str, Any] = {}
            for style, tokens in (("direct", cfg.direct_tokens), ("cot", cfg.cot_tokens)):
                text = prompt(style, chain, example)
                replies = generate(self.llm, self.tokenizer, [text] * len(conds), specs, tokens)
                out[style] = [{"condition": c, "seed": s, "reply": r, **judge(style, chain, r)}
                              for (c, s, _), r in zip(conds, replies)]
            logprobs = continuation_logprobs(self.llm, self.tokenizer, [prompt("direct", chain, example)] * len(conds),
                                             [" " + chain.answer] * len(conds), specs)
            out["answer_logprob"] = [{"condition": c, "seed": s, "logprob": lp} for (c, s, _), lp in zip(conds, logprobs)]
            return out

        return self.cache.compute(key, compute)

    # ----- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        known, counts = self.screened()
        chains, examples = self.select(known)
        facts = [KNExample(id=f"{c.id}/hop1", prompts=[c.hop1_prompt], target=" " + c.e2, meta={"relation": c.r1})
                 for c in chains]
        results = self.score_facts(KN, self.config.method_params(), facts)
        rows = []
        for chain, result in tqdm(list(zip(chains, results)), desc="two-hop answers", unit="chain",
                                  disable=not self.progress):
            neurons = [(n.layer, n.index) for n in result.neurons]
            if not neurons:
                continue
            got = self.answers(chain, examples[chain.pair], neurons)
            rows.append(chain_row(chain, neurons, got))
        return {
            "protocol": "two-hop", "model": self.ref.name, "model_fingerprint": self.ref.fingerprint,
            "data": str(self.folder), "data_sha256": self.folder_sha, "config": self.two_hop.model_dump(),
            "method": {"name": KN.name, "params": self.config.method_params().model_dump()},
            "screened": counts, "examples": {p: e.id for p, e in examples.items()},
            "evaluated_chains": len(chains), "chains_without_neurons": sum(1 for r in results if not r.neurons),
            "overall": summarize(rows), "by_pair": {p: summarize([r for r in rows if r["pair"] == p]) for p in examples},
            "per_chain": rows, "seconds": round(time.perf_counter() - started, 1),
        }


def chain_row(chain: TwoHopChain, neurons: Sequence[Pair], got: dict[str, Any]) -> dict[str, Any]:
    """One chain's outcomes per condition (controls: the mean over seeds)."""
    row: dict[str, Any] = {"id": chain.id, "pair": chain.pair, "neurons": len(neurons),
                           "layers": layer_counts(neurons)}
    for style in STYLES:
        for measure in ("correct", "bridge"):
            if measure not in got[style][0]:
                continue
            by: dict[str, list[float]] = {}
            for entry in got[style]:
                by.setdefault(entry["condition"], []).append(float(entry[measure]))
            for cond, values in by.items():
                row[f"{style}_{measure}_{cond}"] = statistics.mean(values)
    by_lp: dict[str, list[float]] = {}
    for entry in got["answer_logprob"]:
        by_lp.setdefault(entry["condition"], []).append(entry["logprob"])
    for cond, values in by_lp.items():
        row[f"logprob_{cond}"] = statistics.mean(values)
    row["replies"] = {style: {e["condition"]: e["reply"] for e in got[style] if e["seed"] in (None, 0)}
                      for style in STYLES}
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (and bridge rate, answer log-probability) per condition with the paired tests."""
    out: dict[str, Any] = {"chains": len(rows)}
    if not rows:
        return out
    measures = [("direct", "correct"), ("cot", "correct"), ("cot", "bridge")]
    for style, measure in measures:
        name = f"{style}_{measure}"
        base = [r[f"{name}_base"] for r in rows]
        entry: dict[str, Any] = {"base": statistics.mean(base)}
        for dose in DOSES:
            mine = [r[f"{name}_{dose}"] for r in rows]
            control = [r[f"{name}_matched_{dose}"] for r in rows]
            entry[dose] = statistics.mean(mine)
            entry[f"matched_{dose}"] = statistics.mean(control)
            entry[f"p_{dose}_vs_base"] = compare_paired_binary([(bool(m), bool(b)) for m, b in zip(mine, base)]).p_value
            entry[f"p_{dose}_vs_matched"] = compare_paired_signed_rank(list(zip(mine, control))).p_value
            entry[f"p_matched_{dose}_vs_base"] = compare_paired_signed_rank(list(zip(control, base))).p_value
        out[name] = entry
    lp: dict[str, Any] = {"base": statistics.mean(r["logprob_base"] for r in rows)}
    for dose in DOSES:
        lp[dose] = statistics.mean(r[f"logprob_{dose}"] - r["logprob_base"] for r in rows)
        lp[f"matched_{dose}"] = statistics.mean(r[f"logprob_matched_{dose}"] - r["logprob_base"] for r in rows)
        lp[f"p_{dose}_vs_matched"] = compare_paired_signed_rank(
            [(r[f"logprob_{dose}"], r[f"logprob_matched_{dose}"]) for r in rows]).p_value
    out["answer_logprob_change"] = lp
    return out
