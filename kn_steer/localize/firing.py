"""How often neurons fire, counted over chosen token positions (corpus statistics).

"Fires" is defined per family by :func:`kn_steer.models.sites.hook_firing`. Rows of token ids are
left-padded into batches; ``keep`` marks, per row, the positions counted (the rest, padding
included, still feed the model as context but are not counted). The model runs without its LM
head. Used by the ``language`` method (LAPE) and the parallel-input analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from kn_steer.localize.recorder import left_padded_ids
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_firing, remove_hooks
from kn_steer.tokens import pad_id, prompt_ids


@dataclass
class FiringCounts:
    """``per_token[layer, unit]``: kept tokens on which the neuron fired (of ``tokens``);
    ``per_row_any[layer, unit]``: rows in which it fired on some kept token (of ``rows``);
    ``row_rate[i]``: the share of (kept token, neuron) pairs of row ``i`` that fired."""

    per_token: torch.Tensor
    tokens: int
    per_row_any: torch.Tensor
    rows: int
    row_rate: torch.Tensor


@torch.no_grad()
def count_firing(model: Any, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[bool]], pad: int,
                 batch_size: int = 16, progress: Callable[[int], None] | None = None) -> FiringCounts:
    """Count firing over the kept positions of every row (see the module docstring)."""
    shape = ModelShape.from_config(model.config)
    per_token = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=torch.long)
    per_row_any = torch.zeros_like(per_token)
    fired_per_row = torch.zeros(len(rows), dtype=torch.float64)
    kept_per_row = torch.tensor([sum(map(bool, k)) for k in keep], dtype=torch.float64)
    current: dict[str, Any] = {}

    def record(layer: int, fires: torch.Tensor) -> None:
        mask = current["keep"]  # [B, T]
        fires = fires.reshape(*mask.shape, -1) & mask[..., None]
        per_token[layer] += fires.sum((0, 1)).cpu()
        per_row_any[layer] += fires.any(1).sum(0).cpu()
        fired_per_row[current["idx"]] += fires.sum((1, 2)).double().cpu()

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    handles = hook_firing(model, record)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = left_padded_ids([rows[i] for i in idx], pad, device)
            mask = torch.zeros(len(idx), batch.width, dtype=torch.bool, device=device)
            for j, i in enumerate(idx):
                if len(keep[i]) != len(rows[i]):
                    raise ValueError(f"row {i}: keep has {len(keep[i])} flags for {len(rows[i])} tokens")
                if rows[i]:
                    mask[j, batch.width - len(rows[i]):] = torch.tensor(list(map(bool, keep[i])), device=device)
            current.update(keep=mask, idx=torch.tensor(idx))
            body(**batch.model_inputs())
            if progress is not None:
                progress(len(idx))
    finally:
        remove_hooks(handles)
    neurons = shape.num_layers * shape.intermediate_size
    return FiringCounts(per_token, int(kept_per_row.sum()), per_row_any, len(rows),
                        fired_per_row / (kept_per_row * neurons).clamp_min(1))


def firing_counts(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int = 64, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
    """``[layers, units]`` tokens on which each neuron fires over ``texts`` (each tokenized as at
    inference, cut to ``max_tokens``), and the tokens counted. Special tokens (``<bos>``) are
    not counted: they are the same whatever the text."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows = [prompt_ids(tokenizer, t)[:max_tokens] for t in texts]
    keep = [[token not in specials for token in row] for row in rows]
    counts = count_firing(model, rows, keep, pad_id(tokenizer), batch_size, progress)
    return counts.per_token, counts.tokens
