"""Does ablating entropy neurons change the output's entropy far more than the loss, compared with
random neurons of the same layer? (Stolfo et al.; the post-training paper's entropy-neuron analysis.)

On held-in English text, per text: the mean next-token entropy and the mean next-token loss (NLL),
unsteered, with the set ablated and with ``seeds`` draws of random neurons with the set's per-layer
counts ablated the same way. ``mean`` ablation (the default, as Stolfo et al.) clamps each neuron to
its own mean activation over the texts' tokens, so a neuron is silenced without the shift that
zeroing a neuron with a large mean would add; ``zero`` clamps to 0. Reported per condition: the mean
change of entropy and of loss against unsteered (per text, averaged), the mean *absolute* change,
the ratio |dH| / |dL|, and Wilcoxon signed-rank p-values over texts for entropy and loss.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.eval.controls import compiled_for, matched_neurons
from kn_steer.eval.perplexity import text_token_stats
from kn_steer.localize.recorder import mean_activations
from kn_steer.models.families import ModelShape
from kn_steer.stats import compare_paired_signed_rank
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import UNLIMITED


def _per_text(stats: list[tuple[float, float, int]]) -> tuple[list[float], list[float]]:
    """(mean entropy, mean loss) per text, in nats per token."""
    return [h / max(n, 1) for _, h, n in stats], [nll / max(n, 1) for nll, _, n in stats]


def _change(entropy: list[float], loss: list[float], base_h: list[float], base_l: list[float]) -> dict[str, Any]:
    dh = [a - b for a, b in zip(entropy, base_h)]
    dl = [a - b for a, b in zip(loss, base_l)]
    abs_h, abs_l = statistics.mean(map(abs, dh)), statistics.mean(map(abs, dl))
    return {"entropy": statistics.mean(entropy), "loss": statistics.mean(loss),
            "d_entropy": statistics.mean(dh), "d_loss": statistics.mean(dl),
            "abs_d_entropy": abs_h, "abs_d_loss": abs_l, "ratio": abs_h / abs_l if abs_l > 0 else None,
            "p_entropy": compare_paired_signed_rank(list(zip(entropy, base_h))).p_value,
            "p_loss": compare_paired_signed_rank(list(zip(loss, base_l))).p_value}


def ablation(neurons: Sequence[tuple[int, int]], shape: ModelShape, means: dict[int, torch.Tensor] | None):
    """Clamp each neuron to its mean (``means``) or, without means, to 0."""
    if means is None:
        return compiled_for(neurons, shape, "clamp", value=0.0)
    spec = {"interventions": [{"neurons": [[l, i]], "op": "clamp", "value": float(means[l][i])} for l, i in neurons]}
    return compile_spec(spec, {}, shape, limits=UNLIMITED)


def run(model: Any, tokenizer: Any, texts: Sequence[str], neurons: Sequence[tuple[int, int]], mode: str = "mean",
        seeds: int = 5, max_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """The table; JSON-ready."""
    if mode not in ("mean", "zero"):
        raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
    shape = ModelShape.from_config(model.config)
    conditions = [("set", list(neurons))] + [(f"matched/{s}", matched_neurons(neurons, shape, s)) for s in range(seeds)]
    means = None
    if mode == "mean":
        means = mean_activations(model, tokenizer, texts, sorted({l for l, _ in neurons}), max_tokens)
    base_h, base_l = _per_text(text_token_stats(model, tokenizer, texts, None, max_tokens, batch_size))
    rows: dict[str, Any] = {}
    for label, chosen in tqdm(conditions, desc="entropy conditions", disable=not progress):
        compiled = ablation(chosen, shape, means)
        h, l = _per_text(text_token_stats(model, tokenizer, texts, compiled, max_tokens, batch_size))
        rows[label] = _change(h, l, base_h, base_l)
    controls = [rows[f"matched/{s}"] for s in range(seeds)]
    summary = {key: {"mean": statistics.mean(c[key] for c in controls),
                     "sd": statistics.stdev(c[key] for c in controls) if seeds > 1 else 0.0}
               for key in ("abs_d_entropy", "abs_d_loss", "d_entropy", "d_loss")}
    return {"protocol": "entropy-ablation", "texts": len(texts), "max_tokens": max_tokens,
            "neurons": [list(n) for n in neurons], "ablation": mode, "seeds": seeds,
            "unsteered": {"entropy": statistics.mean(base_h), "loss": statistics.mean(base_l)},
            "set": rows["set"], "matched": controls, "matched_summary": summary}


__all__ = ["run"]
