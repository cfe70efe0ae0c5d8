"""Does deactivating an attribute's neurons hurt emotion inference more than random neurons do, and
more for the attributes that matter more to humans? (Li et al.)

Emotion inference is GoEmotions, zero-shot: each comment with one emotion label becomes a
27-way multiple choice over the emotion names (:func:`kn_steer.data.emotion.inference_items`),
scored by the library's packed scorer (:func:`kn_steer.eval.scoring.score_hf`). Two rules:
``total`` (the name with the highest log-probability) and ``calibrated`` (minus its log-probability
after the bare answer cue :data:`~kn_steer.data.emotion.INFERENCE_PREMISE`, computed under the same
intervention: the name's prior and length cancel). Per item, the *gold log-softmax* is the
log-probability of the right name under a softmax of the calibrated scores over the 27 names: a
continuous measure that moves even when the argmax does not, which matters for a small model near
chance.

Per attribute: the set deactivated (clamp 0) and ``seeds`` matched random sets (the same number of
neurons in each layer, same dose). The attribute's *excess damage* is the set's drop of mean gold
log-softmax minus the controls' mean drop; a Wilcoxon signed-rank test over items compares the
set's per-item gold log-softmax with the controls' mean. The paper's second claim is checked by a
Spearman correlation between excess damage and the attribute's *importance in human rating space*:
its share of the emotions' summed pairwise squared distances in the rating table (an attribute that
barely varies over the emotions cannot tell them apart). Li et al. do not define importance in
their abstract; this definition is ours.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch
from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from kn_steer.data.common import ChoiceItem
from kn_steer.data.emotion import INFERENCE_PREMISE, EmotionAttributes
from kn_steer.eval.controls import deactivation, matched_neurons
from kn_steer.eval.scoring import encode_items, score_hf
from kn_steer.models.families import ModelShape
from kn_steer.stats import compare_paired_signed_rank

Pair = tuple[int, int]


def importance(table: EmotionAttributes) -> dict[str, float]:
    """Each attribute's share of the summed pairwise squared distances between emotions (equal to
    its share of the summed variances)."""
    variances = table.scores.var(0, unbiased=False)
    return {name: float(v / variances.sum()) for name, v in zip(table.attributes, variances)}


def overlap(sets: dict[str, Sequence[Pair]]) -> dict[str, dict[str, float]]:
    """Jaccard overlap of every pair of sets (1 on the diagonal)."""
    as_sets = {name: set(map(tuple, neurons)) for name, neurons in sets.items()}
    return {a: {b: len(sa & sb) / max(len(sa | sb), 1) for b, sb in as_sets.items()} for a, sa in as_sets.items()}


class InferenceScorer:
    """Scores the items (and the premise) under one intervention; encodes once."""

    def __init__(self, model: Any, tokenizer: Any, items: Sequence[ChoiceItem], batch_size: int = 8) -> None:
        if not items:
            raise ValueError("no items to score")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.encoded = encode_items(tokenizer, items)
        premise = ChoiceItem(id="premise", prompt=INFERENCE_PREMISE, choices=items[0].choices, faithful=0,
                             trap=None, context="", question_prompt=INFERENCE_PREMISE)
        self.premise = encode_items(tokenizer, [premise])
        self.gold = torch.tensor([e.item.faithful for e in self.encoded])

    def measure(self, compiled: Any) -> dict[str, Any]:
        """Accuracy under both rules, and the per-item gold log-softmax (calibrated)."""
        scores = score_hf(self.model, self.tokenizer, self.encoded, compiled, self.batch_size, calibrate=False)
        total = torch.tensor([s.logprobs for s in scores], dtype=torch.float64)
        prior = torch.tensor(score_hf(self.model, self.tokenizer, self.premise, compiled, 1, calibrate=False)[0].logprobs,
                             dtype=torch.float64)
        calibrated = total - prior
        rows = torch.arange(len(self.gold))
        gold = torch.log_softmax(calibrated, -1)[rows, self.gold]
        return {"accuracy_total": float((total.argmax(-1) == self.gold).double().mean()),
                "accuracy_calibrated": float((calibrated.argmax(-1) == self.gold).double().mean()),
                "gold_log_softmax": gold.tolist()}


def _summary(m: dict[str, Any]) -> dict[str, float]:
    return {"accuracy_total": m["accuracy_total"], "accuracy_calibrated": m["accuracy_calibrated"],
            "gold_log_softmax": statistics.fmean(m["gold_log_softmax"])}


def run(model: Any, tokenizer: Any, items: Sequence[ChoiceItem], sets: dict[str, Sequence[Pair]],
        weights: dict[str, float] | None = None, seeds: int = 3, batch_size: int = 8,
        progress: bool = True) -> dict[str, Any]:
    """The table for every set (JSON-ready). ``weights``: each attribute's importance
    (:func:`importance`), for the correlation with excess damage."""
    shape = ModelShape.from_config(model.config)
    scorer = InferenceScorer(model, tokenizer, items, batch_size)
    names = [n for n, neurons in sets.items() if neurons]
    bar = tqdm(total=1 + len(names) * (1 + seeds), desc="emotion inference", unit="run", disable=not progress)
    try:
        base = scorer.measure(None)
        bar.update(1)
        rows: dict[str, Any] = {}
        for name in names:
            neurons = [tuple(p) for p in sets[name]]
            chosen = scorer.measure(deactivation(neurons, shape))
            bar.update(1)
            controls = []
            for seed in range(seeds):
                controls.append(scorer.measure(deactivation(matched_neurons(neurons, shape, seed), shape)))
                bar.update(1)
            rows[name] = _row(base, chosen, controls, len(neurons))
    finally:
        bar.close()
    result = {"protocol": "emotion-attribute-deactivation", "items": len(items), "seeds": seeds,
              "chance_accuracy": 1 / len(items[0].choices), "majority_accuracy": _majority(scorer.gold),
              "unsteered": _summary(base), "attributes": rows}
    result["summary"] = summarize(rows, weights)
    return result


def _majority(gold: torch.Tensor) -> float:
    return float(torch.bincount(gold).max()) / max(len(gold), 1)


def _row(base: dict[str, Any], chosen: dict[str, Any], controls: list[dict[str, Any]], size: int) -> dict[str, Any]:
    def drop(m: dict[str, Any]) -> dict[str, float]:
        s, b = _summary(m), _summary(base)
        return {k: b[k] - s[k] for k in s}

    control_drops = [drop(c) for c in controls]
    row: dict[str, Any] = {"neurons": size, "set_drop": drop(chosen), "control_drops": control_drops}
    if controls:
        mean_control = [statistics.fmean(vals) for vals in zip(*(c["gold_log_softmax"] for c in controls))]
        test = compare_paired_signed_rank(list(zip(chosen["gold_log_softmax"], mean_control)))
        row["excess_drop"] = {k: row["set_drop"][k] - statistics.fmean(c[k] for c in control_drops)
                              for k in row["set_drop"]}
        row["p_set_vs_controls"] = test.p_value
        row["worse_than_every_control"] = all(row["set_drop"]["gold_log_softmax"] > c["gold_log_softmax"]
                                              for c in control_drops)
    return row


def summarize(rows: dict[str, Any], weights: dict[str, float] | None = None) -> dict[str, Any]:
    """How many sets hurt more than all their controls (and significantly), and the Spearman
    correlation of excess damage with importance."""
    with_controls = {n: r for n, r in rows.items() if "excess_drop" in r}
    out: dict[str, Any] = {
        "attributes": len(rows),
        "worse_than_every_control": sum(r["worse_than_every_control"] for r in with_controls.values()),
        "worse_and_p_below_0.05": sum(r["worse_than_every_control"] and r["p_set_vs_controls"] < 0.05
                                      for r in with_controls.values()),
    }
    shared = [n for n in with_controls if weights and n in weights]
    if len(shared) >= 3:
        rho = scipy_stats.spearmanr([weights[n] for n in shared],
                                    [with_controls[n]["excess_drop"]["gold_log_softmax"] for n in shared])
        out["importance_spearman_rho"] = float(rho.statistic)
        out["importance_spearman_p"] = float(rho.pvalue)
    return out


def plot(results: dict[str, dict[str, Any]], weights: dict[str, float], path: Any) -> None:
    """Per model: each attribute's drop of gold log-softmax, set vs its controls; and excess damage
    against importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kn_steer.fileio import atomic_savefig

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for (model, result), (left, right) in zip(results.items(), axes):
        rows = result["attributes"]
        names = list(rows)
        x = range(len(names))
        left.bar(x, [rows[n]["set_drop"]["gold_log_softmax"] for n in names], color="tab:red", label="attribute set")
        for n_i, n in enumerate(names):
            drops = [c["gold_log_softmax"] for c in rows[n]["control_drops"]]
            left.scatter([n_i] * len(drops), drops, color="black", s=10, zorder=3,
                         label="matched random" if n_i == 0 else None)
        left.axhline(0, color="grey", lw=0.8)
        left.set_xticks(list(x), names, rotation=60, ha="right")
        left.set_ylabel("drop of gold log-softmax (nats)")
        left.set_title(f"{model}: deactivation, {result['items']} GoEmotions test items")
        left.legend(fontsize=8)
        shared = [n for n in names if n in weights and "excess_drop" in rows[n]]
        right.scatter([weights[n] for n in shared], [rows[n]["excess_drop"]["gold_log_softmax"] for n in shared])
        for n in shared:
            right.annotate(n, (weights[n], rows[n]["excess_drop"]["gold_log_softmax"]), fontsize=7)
        right.axhline(0, color="grey", lw=0.8)
        right.set_xlabel("importance in human rating space (variance share)")
        right.set_ylabel("excess drop vs controls (nats)")
        rho = result["summary"].get("importance_spearman_rho")
        right.set_title(f"Spearman rho {rho:.2f}" if rho is not None else "importance")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


__all__ = ["InferenceScorer", "importance", "overlap", "plot", "run", "summarize"]
