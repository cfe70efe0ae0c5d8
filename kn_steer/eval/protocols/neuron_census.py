"""A census of MLP neurons over natural text: dead, token-detector and positional neurons, and
whether detectors remove their trigger token (Voita et al., "Neurons in LLMs: dead, n-gram,
positional"; OPT 125M-66B).

One pass over the texts (each tokenized as at inference, cut to ``max_tokens``; special tokens not
counted) records per neuron: how often it fires ("fires" per family: gate open for gated MLPs,
:func:`kn_steer.models.sites.hook_firing`), how often on each of the ``top_types`` most frequent
token types and its summed activation there, and its activation summed per position. Then:

* **dead**: never fires on the corpus.
* **token detector**: alive, fires on at most ``max_rate`` of tokens, at least ``min_fires``
  times, and one token type takes at least ``min_share`` of its firings (only the frequent types
  are counted, so detectors of rare tokens are missed).
* **positional**: position explains at least ``min_r2`` of its activation's variance, from the
  second token on (``first_position``).
* **removal**: the detector's update on its trigger (its mean activation there times its write
  direction through the final norm and the LM head) as a z-score of the trigger token's logit
  among all tokens; Voita et al. find it negative (the neuron removes the token it detects).
  Control: for each detector a random neuron of the same layer, signed by its own mean activation
  on the same trigger, scored on the same token.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.localize.recorder import left_padded_ids
from kn_steer.localize.vocabulary import logits_of
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_firing, hook_site, remove_hooks
from kn_steer.stats import compare_paired_signed_rank
from kn_steer.tokens import pad_id, prompt_ids


@dataclass
class CensusCounts:
    """Sums over the kept tokens (see the module docstring); shapes ``[layers, units]`` unless said."""

    tokens: int
    fires: torch.Tensor
    type_ids: list[int]
    type_counts: torch.Tensor  # [types]
    type_fires: torch.Tensor  # [types, layers, units]
    type_act: torch.Tensor  # [types, layers, units]: summed activation where it fired on the type
    pos_counts: torch.Tensor  # [positions]
    pos_sum: torch.Tensor  # [positions, layers, units]
    pos_sq: torch.Tensor  # [positions, layers, units]: summed squared activation


@torch.no_grad()
def census_counts(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int = 64, top_types: int = 300,
                  batch_size: int = 16, progress: bool = True) -> CensusCounts:
    """One pass of sums over ``texts`` (see the module docstring)."""
    shape = ModelShape.from_config(model.config)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows = [prompt_ids(tokenizer, t)[:max_tokens] for t in texts]
    frequency = Counter(tok for row in rows for tok in row if tok not in specials)
    type_ids = [tok for tok, _ in frequency.most_common(top_types)]
    slot = torch.full((max(max(r) for r in rows) + 1,), -1, dtype=torch.long)
    slot[torch.tensor(type_ids)] = torch.arange(len(type_ids))
    L, U, T, P = shape.num_layers, shape.intermediate_size, len(type_ids), max_tokens
    out = CensusCounts(0, torch.zeros(L, U), type_ids, torch.zeros(T), torch.zeros(T, L, U), torch.zeros(T, L, U),
                       torch.zeros(P), torch.zeros(P, L, U, dtype=torch.float64),
                       torch.zeros(P, L, U, dtype=torch.float64))
    current: dict[str, Any] = {"fires": {}}

    def on_fire(layer: int, fires: torch.Tensor) -> None:
        current["fires"][layer] = fires

    def on_site(layer: int, h: torch.Tensor) -> None:
        keep, types, positions = current["keep"], current["types"], current["positions"]
        h = h.float() * keep[:, None]
        fired = current["fires"].pop(layer).float() * keep[:, None]
        out.fires[layer] += fired.sum(0)
        out.type_fires[:, layer] += types.T @ fired
        out.type_act[:, layer] += types.T @ (h * fired)
        out.pos_sum[:, layer] += (positions.T @ h).double()
        out.pos_sq[:, layer] += (positions.T @ (h * h)).double()

    handles = hook_firing(model, on_fire)
    handles += hook_site(model, on_site)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="neuron census", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            batch = left_padded_ids([rows[i] for i in idx], pad_id(tokenizer), device)
            ids = batch.input_ids.cpu()
            keep = batch.attention_mask.cpu().bool()
            for special in specials:
                keep &= ids != special
            flat_keep = keep.reshape(-1)
            flat_slot = slot[ids.clamp(max=slot.numel() - 1).reshape(-1)]
            types = torch.zeros(flat_keep.numel(), T)
            hit = flat_keep & (flat_slot >= 0)
            types[hit.nonzero()[:, 0], flat_slot[hit]] = 1.0
            position = (batch.position_ids.cpu().reshape(-1)).clamp(max=P - 1)
            positions = torch.zeros(flat_keep.numel(), P)
            positions[flat_keep.nonzero()[:, 0], position[flat_keep]] = 1.0
            current.update(keep=flat_keep.float(), types=types, positions=positions)
            body(**batch.model_inputs())
            out.tokens += int(flat_keep.sum())
            out.type_counts += types.sum(0)
            out.pos_counts += positions.sum(0)
    finally:
        remove_hooks(handles)
    return out


def _removal_z(model: Any, neurons: Sequence[tuple[int, int]], signs: Sequence[float], tokens: Sequence[int]
               ) -> list[float]:
    """z-score of each token's logit under the neuron's signed direct update, among all tokens."""
    if not neurons:
        return []
    logits = logits_of(model, neurons) * torch.tensor(signs)[:, None]
    mean, std = logits.mean(1), logits.std(1).clamp_min(1e-12)
    picked = logits[torch.arange(len(neurons)), torch.tensor(tokens)]
    return ((picked - mean) / std).tolist()


def analyse(model: Any, tokenizer: Any, counts: CensusCounts, max_rate: float = 0.05, min_fires: int = 20,
            min_share: float = 0.5, min_r2: float = 0.5, seed: int = 0, listed: int = 30,
            first_position: int = 1) -> dict[str, Any]:
    """Per-layer shares of dead, detector and positional neurons; detectors with their tokens; the
    removal test against random neurons. JSON-ready."""
    L, U = counts.fires.shape
    rate = counts.fires / max(counts.tokens, 1)
    dead = counts.fires == 0
    share, top = (counts.type_fires / counts.fires.clamp_min(1)).max(0)
    detector = (~dead) & (rate <= max_rate) & (counts.fires >= min_fires) & (share >= min_share)
    # position explains variance from the second token on: the first token of a text (the attention
    # sink when there is no <bos>) has outlying activations that would make any neuron "positional"
    n_pos = counts.pos_counts[first_position:].double()[:, None, None]
    sums, squares = counts.pos_sum[first_position:], counts.pos_sq[first_position:]
    n = n_pos.sum()
    mean = sums.sum(0) / n
    total_var = squares.sum(0) - n * mean ** 2
    pos_mean = sums / n_pos.clamp_min(1)
    between = (n_pos * (pos_mean - mean[None]) ** 2).sum(0)
    r2 = (between / total_var.clamp_min(1e-12)).float()
    positional = (~dead) & (r2 >= min_r2)
    found = detector.nonzero().tolist()
    triggers = [counts.type_ids[int(top[l, i])] for l, i in found]
    signs = []
    for (l, i) in found:
        t = int(top[l, i])
        signs.append(1.0 if float(counts.type_act[t, l, i]) >= 0 else -1.0)
    z = _removal_z(model, [tuple(n) for n in found], signs, triggers)
    rng = random.Random(seed)
    controls, control_signs = [], []
    for (l, i) in found:
        j = rng.randrange(U)
        t = int(top[l, i])
        controls.append((l, j))
        control_signs.append(1.0 if float(counts.type_act[t, l, j]) >= 0 else -1.0)
    z_control = _removal_z(model, controls, control_signs, triggers)
    ranked = sorted(range(len(found)), key=lambda k: -float(share[found[k][0], found[k][1]]))[:listed]
    examples = [{"layer": found[k][0], "index": found[k][1], "token": tokenizer.decode([triggers[k]]),
                 "share": round(float(share[found[k][0], found[k][1]]), 3),
                 "fires": int(counts.fires[found[k][0], found[k][1]]), "removal_z": round(z[k], 2)} for k in ranked]
    removal = {}
    if z:
        test = compare_paired_signed_rank(list(zip(z, z_control)))
        removal = {"detectors": len(z), "mean_z": statistics.mean(z), "negative_share": sum(v < 0 for v in z) / len(z),
                   "control_mean_z": statistics.mean(z_control),
                   "control_negative_share": sum(v < 0 for v in z_control) / len(z_control),
                   "p_vs_control": test.p_value}
    return {
        "tokens": counts.tokens, "types_counted": len(counts.type_ids),
        "criteria": {"max_rate": max_rate, "min_fires": min_fires, "min_share": min_share, "min_r2": min_r2,
                     "positions_from": first_position},
        "dead_by_layer": dead.float().mean(1).tolist(), "detector_by_layer": detector.float().mean(1).tolist(),
        "positional_by_layer": positional.float().mean(1).tolist(),
        "dead": int(dead.sum()), "detectors": int(detector.sum()), "positional": int(positional.sum()),
        "neurons": L * U, "median_firing_rate_by_layer": rate.median(1).values.tolist(),
        "dead_neurons": dead.nonzero().tolist(), "detector_examples": examples, "removal": removal,
    }


def plot(result: dict[str, Any], title: str, path: Any) -> None:
    """Per-layer shares (dead, detector, positional) and the removal z-scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kn_steer.fileio import atomic_savefig

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("dead_by_layer", "dead"), ("detector_by_layer", "token detectors"),
                       ("positional_by_layer", "positional")):
        left.plot(result[key], marker=".", label=label)
    left.set_xlabel("layer")
    left.set_ylabel("share of the layer's neurons")
    left.legend(fontsize=7)
    removal = result["removal"]
    if removal:
        right.bar([0, 1], [removal["mean_z"], removal["control_mean_z"]], color=["#c33", "#39c"])
        right.set_xticks([0, 1], [f"detectors ({removal['detectors']})", "random, same layer and token"])
        right.set_ylabel("trigger token's logit under the update (z)")
        right.axhline(0, color="black", lw=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


__all__ = ["CensusCounts", "analyse", "census_counts", "plot"]
