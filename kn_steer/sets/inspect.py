"""What a neuron set contains: counts per layer, top neurons, and the tokens each neuron touches.

A neuron reads the residual stream through its row of the MLP input projection (up/fc) and
writes to it through its column of the output projection (down/proj). Projecting either
direction through the unembedding (as in Geva et al. 2022) names the vocabulary it relates to:
the read direction's top tokens are what the neuron responds to, the write direction's top and
bottom tokens are what a *positive* activation promotes and suppresses (a negative activation
swaps the two). No final-norm or bias terms are applied: this is a label, not a prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from kn_steer.fileio import atomic_savefig
from kn_steer.sets.format import ModelIdentity, Neuron, NeuronSet


@dataclass(frozen=True)
class TokenScore:
    """One vocabulary entry and its logit along a neuron's direction."""

    token_id: int
    text: str
    logit: float


@dataclass(frozen=True)
class NeuronTokens:
    """The tokens one neuron reads, promotes and suppresses through the unembedding."""

    layer: int
    index: int
    score: float | None
    reads: list[TokenScore]
    promotes: list[TokenScore]
    suppresses: list[TokenScore]


def check_set_model(ns: NeuronSet, model: str) -> tuple[Any, ModelIdentity]:
    """(ModelRef, identity) of ``model``; refuses a model other than the set's, from config only."""
    from transformers import AutoConfig

    from kn_steer.models import resolve_model
    from kn_steer.sets.format import model_identity

    ref = resolve_model(model)
    identity = model_identity(ref, AutoConfig.from_pretrained(ref.path))
    ns.check_model(identity)
    return ref, identity


def _top_tokens(logits: torch.Tensor, tokenizer: Any, k: int, largest: bool) -> list[list[TokenScore]]:
    values, ids = torch.topk(logits, k=min(k, logits.shape[-1]), dim=-1, largest=largest)
    return [
        [TokenScore(int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values.tolist(), ids.tolist())
    ]


@torch.no_grad()
def neuron_tokens(
    model: torch.nn.Module, tokenizer: Any, neurons: Sequence[Neuron], k: int = 5
) -> list[NeuronTokens]:
    """For each neuron, the top-``k`` tokens of its read and write directions (and bottom-``k``)."""
    from kn_steer.models.families import adapter_for_config
    from kn_steer.models.sites import read_vectors, write_vectors

    if not neurons:
        return []
    adapter = adapter_for_config(model.config)
    unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, hidden]
    by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    reads, writes = [], []
    for n in neurons:
        if n.layer not in by_layer:
            by_layer[n.layer] = (read_vectors(model, n.layer, adapter), write_vectors(model, n.layer, adapter))
        r, w = by_layer[n.layer]
        reads.append(r[n.index])
        writes.append(w[n.index])
    read_logits = torch.stack(reads).float().to(unembed.device) @ unembed.T  # [n, vocab]
    write_logits = torch.stack(writes).float().to(unembed.device) @ unembed.T
    read_top = _top_tokens(read_logits, tokenizer, k, largest=True)
    promote = _top_tokens(write_logits, tokenizer, k, largest=True)
    suppress = _top_tokens(write_logits, tokenizer, k, largest=False)
    return [
        NeuronTokens(n.layer, n.index, n.score, read_top[j], promote[j], suppress[j])
        for j, n in enumerate(neurons)
    ]


def plot_distribution(ns: NeuronSet, path: str | os.PathLike, annotate: int = 5) -> Path:
    """PNG of score against layer (top) and neurons per layer (bottom); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = list(range(ns.model.num_layers))
    counts = ns.counts_per_layer()
    scored = [n for n in ns.neurons if n.score is not None]
    fig, (ax_score, ax_count) = plt.subplots(
        2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    if scored:
        # A small deterministic jitter separates neurons of one layer without hiding their layer.
        def x_of(n: Neuron) -> float:
            return n.layer + ((n.index * 2654435761) % 1000 / 1000 - 0.5) * 0.35

        ax_score.scatter([x_of(n) for n in scored], [n.score for n in scored],
                         s=18, alpha=0.7, color="tab:blue", edgecolors="none")
        for n in ns.top(annotate):
            if n.score is not None:
                ax_score.annotate(f"L{n.layer}.{n.index}", (x_of(n), n.score), fontsize=8,
                                  xytext=(4, 3), textcoords="offset points")
        ax_score.set_ylabel("score")
    else:
        ax_score.text(0.5, 0.5, "this set has no scores", ha="center", va="center",
                      transform=ax_score.transAxes)
        ax_score.set_yticks([])
    ax_score.grid(alpha=0.3)
    ax_score.set_title(
        f"{ns.name}: {len(ns.neurons)} neurons ({ns.method.name}) on {ns.model.name}, "
        f"{ns.model.num_layers} layers x {ns.model.intermediate_size}"
    )
    ax_count.bar(layers, [counts.get(l, 0) for l in layers], color="tab:orange")
    ax_count.set_ylabel("neurons")
    ax_count.set_xlabel("layer")
    ax_count.set_xlim(-0.8, ns.model.num_layers - 0.2)
    ax_count.set_xticks(layers[:: max(1, len(layers) // 15)])
    ax_count.yaxis.get_major_locator().set_params(integer=True)
    ax_count.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return atomic_savefig(fig, path)
