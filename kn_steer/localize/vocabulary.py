"""Neurons read through the LM head: every neuron mapped to tokens, and the neurons of a concept.

Davies et al. map every up-projection neuron of Llama-3.1-8B to tokens through the LM head in
minutes, and clamping the neurons of one concept ("dog") makes the model talk about it. Here a
neuron's *write* direction (its output column, through the norm on the MLP's output where the
family has one) and *read* direction (its up/fc row through the norm before the MLP) are carried
through the final norm's linear part into the LM head (:func:`kn_steer.models.sites.residual_directions`,
:func:`~kn_steer.models.sites.to_unembedding_space`). That is the neuron's *direct* effect on the
logits: later layers are not modelled, and the final norm's division by the residual's scale is a
positive factor per position that changes no ranking.

* :func:`map_neurons` — each neuron's top and bottom tokens, layer by layer in chunks (a 262k
  vocabulary times 2,048 neurons is 2 GiB in float32 otherwise), timed.
* :func:`null_space_writes` — how much of each neuron's write lands in the LM head's effective
  null space (entropy neurons).
* :func:`find_concept` — neurons whose direction singles out a word's tokens, ranked by the
  z-score of the word's logit among all tokens' logits. Means and variances over the vocabulary
  are exact and cheap from the LM head's mean row and Gram matrix, so every neuron is scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.errors import KnSteerError
from kn_steer.models.families import adapter_for_config
from kn_steer.models.sites import residual_directions, to_unembedding_space

DIRECTIONS = ("write", "read")


def lm_head(model: Any) -> torch.Tensor:
    """[vocab, hidden] float32: the unembedding."""
    return model.get_output_embeddings().weight.detach().float()


def unembedding_directions(model: Any, layer: int, direction: str = "write") -> torch.Tensor:
    """[intermediate, hidden]: one layer's neurons in the space the LM head reads."""
    if direction not in DIRECTIONS:
        raise KnSteerError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    family = adapter_for_config(model.config)
    return to_unembedding_space(model, residual_directions(model, layer, direction, family), family)


@dataclass
class NeuronTokenMap:
    """Per neuron of one layer: the ``k`` top and bottom token ids of its direction, with logits."""

    layer: int
    direction: str
    top_ids: torch.Tensor  # [intermediate, k]
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor


@torch.no_grad()
def map_layer(model: Any, layer: int, direction: str = "write", k: int = 10, chunk: int = 256) -> NeuronTokenMap:
    """Top and bottom ``k`` tokens of every neuron of ``layer``."""
    head = lm_head(model)
    dirs = unembedding_directions(model, layer, direction)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, dirs.shape[0], chunk):
        logits = dirs[start:start + chunk] @ head.T  # [chunk, vocab]
        top = torch.topk(logits, k, dim=-1)
        bottom = torch.topk(logits, k, dim=-1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
    return NeuronTokenMap(layer, direction, *cat)


@dataclass
class VocabularyMap:
    """Every neuron's tokens, with the time it took."""

    direction: str
    k: int
    layers: list[NeuronTokenMap] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self, tokenizer: Any) -> Iterator[dict[str, Any]]:
        """One JSON-ready row per neuron (token texts decoded)."""
        for m in self.layers:
            for i in range(m.top_ids.shape[0]):
                yield {"layer": m.layer, "index": i, "direction": m.direction,
                       "top": [[int(t), tokenizer.decode([int(t)]), round(float(v), 4)]
                               for t, v in zip(m.top_ids[i], m.top_logits[i])],
                       "bottom": [[int(t), tokenizer.decode([int(t)]), round(float(v), 4)]
                                  for t, v in zip(m.bottom_ids[i], m.bottom_logits[i])]}


def map_neurons(model: Any, direction: str = "write", k: int = 10, layers: Sequence[int] | None = None,
                chunk: int = 256, progress: bool = False) -> VocabularyMap:
    """:func:`map_layer` for every layer (or ``layers``), timed."""
    family = adapter_for_config(model.config)
    chosen = list(range(family.num_layers(model.config))) if layers is None else list(layers)
    started = time.perf_counter()
    out = VocabularyMap(direction, k)
    for layer in tqdm(chosen, desc=f"map {direction} directions", unit="layer", disable=not progress):
        out.layers.append(map_layer(model, layer, direction, k, chunk))
    out.seconds = time.perf_counter() - started
    return out


def concept_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The single-token spellings of ``word``: as given, capitalized, lower case, each with and
    without a leading space. A word with no single-token spelling is an error."""
    variants = {v for w in (word, word.capitalize(), word.lower()) for v in (w, " " + w)}
    ids = sorted({tuple(tokenizer(v, add_special_tokens=False)["input_ids"]) for v in variants})
    single = sorted({t[0] for t in ids if len(t) == 1})
    if not single:
        raise KnSteerError(f"{word!r} is not one token in this vocabulary in any spelling "
                           f"({', '.join(sorted(variants))}); choose a word the tokenizer keeps whole")
    return single


@dataclass(frozen=True)
class ConceptNeuron:
    """A neuron's affinity to a concept: the z-score of the concept's best token among all tokens'
    logits along the neuron's direction, and that token."""

    layer: int
    index: int
    z: float
    token_id: int
    rank: int  # of that token among all tokens (0: the neuron's top token)


@torch.no_grad()
def find_concept(model: Any, tokenizer: Any, word: str, direction: str = "write", top: int = 10,
                 max_rank: int | None = 10, layers: Sequence[int] | None = None) -> list[ConceptNeuron]:
    """The ``top`` neurons whose direction most singles out ``word`` (largest z-score), keeping
    only neurons that put one of its spellings among their ``max_rank`` first tokens (None: all).

    z = (d . u_c - d . mean(u)) / sqrt(d^T Cov(u) d) over the vocabulary rows u of the LM head, for the
    word's best single-token spelling c; exact, with the mean row and the covariance computed once.
    The rank filter keeps neurons *about* the word, not ones where it is one outlier among others."""
    ids = concept_token_ids(tokenizer, word)
    head = lm_head(model)
    mean = head.mean(0)
    cov = (head - mean).T @ (head - mean) / head.shape[0]
    family = adapter_for_config(model.config)
    chosen = list(range(family.num_layers(model.config))) if layers is None else list(layers)
    found: list[ConceptNeuron] = []
    for layer in chosen:
        dirs = unembedding_directions(model, layer, direction)
        sd = ((dirs @ cov) * dirs).sum(-1).clamp_min(1e-12).sqrt()
        z = (dirs @ head[ids].T - (dirs @ mean)[:, None]) / sd[:, None]  # [intermediate, spellings]
        best, which = z.max(-1)
        order = torch.topk(best, min(4 * top, best.shape[0])).indices  # candidates; ranks need full logits
        logits = dirs[order] @ head.T
        chosen_logit = logits.gather(1, torch.tensor([[ids[int(which[i])]] for i in order]))
        ranks = (logits > chosen_logit).sum(-1)
        found += [ConceptNeuron(layer, int(i), float(best[i]), ids[int(which[i])], int(r))
                  for i, r in zip(order, ranks) if max_rank is None or int(r) < max_rank]
    found.sort(key=lambda n: -n.z)
    return found[:top]


@torch.no_grad()
def null_space_writes(model: Any, layer: int, null_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron of ``layer``: (norm of its write direction in the LM head's space, the part of it in
    the head's effective null space: the ``null_dims`` right-singular directions with the smallest
    singular values). A neuron writing there changes the residual's norm, hence the final norm's
    scale and the output's entropy, while barely moving any logit directly (Stolfo et al.)."""
    head = lm_head(model)
    hidden = head.shape[1]
    if not 1 <= null_dims < hidden:
        raise KnSteerError(f"null_dims must be between 1 and {hidden - 1}, got {null_dims}")
    _, vectors = torch.linalg.eigh(head.T.double() @ head.double())  # ascending eigenvalues = singular values^2
    null = vectors[:, :null_dims].float()  # [hidden, null_dims]
    dirs = unembedding_directions(model, layer, "write")
    return dirs.norm(dim=-1), (dirs @ null).norm(dim=-1)


def logits_of(model: Any, neurons: Sequence[tuple[int, int]], direction: str = "write") -> torch.Tensor:
    """[n, vocab]: the full logit vector of each neuron's direction (for checks and plots)."""
    by_layer: dict[int, torch.Tensor] = {}
    rows = []
    for layer, index in neurons:
        if layer not in by_layer:
            by_layer[layer] = unembedding_directions(model, layer, direction)
        rows.append(by_layer[layer][index])
    return torch.stack(rows) @ lm_head(model).T


__all__ = ["ConceptNeuron", "DIRECTIONS", "NeuronTokenMap", "VocabularyMap", "concept_token_ids", "find_concept",
           "logits_of", "map_layer", "map_neurons", "null_space_writes", "unembedding_directions"]
