"""The plain per-layer reference for integrated gradients: the oracle the fast engine must match.

For each layer, the ``m`` interpolation points are one batch; the FULL prompt (plus the target
tokens in ``"sum"`` mode) runs through the whole model, with a pre-hook on that layer's neuron
module replacing the last prompt position's neuron vector by the interpolation leaf; one backward
per layer. No caching, no shared work: obviously right, and slow.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kn_steer.models.sites import neuron_modules


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, T, I] (OPT flattens its MLP input to [rows * T, I])."""
    return x if x.dim() == 3 else x.view(rows, -1, x.shape[-1])


def _last_token_activations(model, ids: Sequence[int], position: int) -> torch.Tensor:
    mods = neuron_modules(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, a, j=j: seen.__setitem__(j, _rows(a[0], 1)[0, position].detach().clone())
        )
        for j, m in enumerate(mods)
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[j] for j in range(len(mods))])


def reference_attribution(
    model,
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    baseline_ids: Sequence[int] | None = None,
    steps: int = 20,
    target_mode: str = "first",
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """IG scores [L, I] (float32, CPU), one layer at a time over full forwards.

    ``layers``: only these layers (the others' rows stay NaN), for long prompts on real models."""
    device = next(model.parameters()).device
    last = len(prompt_ids) - 1
    ids = list(prompt_ids)
    targets = list(target_ids[:1])
    if target_mode == "sum":
        ids += list(target_ids[:-1])
        targets = list(target_ids)
    acts = _last_token_activations(model, prompt_ids, last)
    base = torch.zeros_like(acts) if baseline_ids is None else _last_token_activations(model, baseline_ids, -1)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=device)[:, None] / steps
    batch = torch.tensor([ids] * steps, device=device)
    want = torch.tensor(targets, device=device)
    scores = torch.full(acts.shape, torch.nan, dtype=torch.float32, device=device)
    for layer, module in enumerate(neuron_modules(model)):
        if layers is not None and layer not in layers:
            continue
        leaf = (base[layer].float() + alphas * (acts[layer].float() - base[layer].float()))
        leaf = leaf.to(acts.dtype).requires_grad_(True)

        def hook(_m, args, leaf=leaf):
            x = _rows(args[0], steps).clone()
            x[:, last] = leaf.to(x.dtype)
            return (x.view(args[0].shape), *args[1:])

        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.enable_grad():
                # the scored positions are the last len(targets) ones: skip the others' logits
                logits = model(batch, use_cache=False, logits_to_keep=len(targets)).logits.float()
                probs = torch.softmax(logits, dim=-1)  # [m, n, V]
                total = probs[:, torch.arange(len(targets)), want].sum()
                (grad,) = torch.autograd.grad(total, leaf)
        finally:
            handle.remove()
        scores[layer] = (acts[layer].float() - base[layer].float()) * grad.float().sum(0) / steps
    return scores.cpu()
