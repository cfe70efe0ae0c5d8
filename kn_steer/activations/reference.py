"""Corpus statistics with transformers hooks: the reference the vLLM path is checked against.

Rows are left-padded into batches (:func:`kn_steer.localize.recorder.left_padded_ids`); one
forward per batch records every layer's site (the canonical ``[rows, units]`` view). Counted
positions: every token of a row, or its last (padding never counts); each counts in its row's
group, or in its own where the corpus counts tokens apart (:func:`~kn_steer.activations.corpus.by_position`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kn_steer.activations.corpus import TokenCorpus
from kn_steer.localize.recorder import left_padded_ids, length_batches
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_site, remove_hooks
from kn_steer.tokens import pad_id


@torch.no_grad()
def reference_stats(model: Any, tokenizer: Any, corpus: TokenCorpus, threshold: float = 0.0,
                    positions: str = "all", batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """``fires``, ``sums``, ``maxes`` as ``[groups, layers, units]`` over ``corpus``."""
    shape = ModelShape.from_config(model.config)
    size = (len(corpus.groups), shape.num_layers, shape.intermediate_size)
    fires = torch.zeros(size, dtype=torch.float64)
    sums = torch.zeros(size, dtype=torch.float64)
    maxes = torch.full(size, -torch.inf, dtype=torch.float32)
    current: dict[str, torch.Tensor] = {}

    def record(layer: int, rows: torch.Tensor) -> None:
        keep, groups = current["keep"], current["groups"]
        values = rows.reshape(*keep.shape, -1)[keep].float().cpu()  # [kept tokens, units]
        fires[:, layer].index_add_(0, groups, (values > threshold).double())
        sums[:, layer].index_add_(0, groups, values.double())
        maxes[:, layer].scatter_reduce_(0, groups[:, None].expand_as(values), values, "amax")

    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    handles = hook_site(model, record)
    try:
        for idx in length_batches(corpus.rows, batch_size):
            rows = [corpus.rows[i] for i in idx]
            batch = left_padded_ids(rows, pad_id(tokenizer), device)
            keep = batch.attention_mask.bool()
            if positions == "last":
                keep = torch.zeros_like(keep)
                keep[:, -1] = True
            current["keep"] = keep
            groups = [corpus.row_groups(i) if positions == "all" else corpus.row_groups(i)[-1:] for i in idx]
            current["groups"] = torch.tensor([g for row in groups for g in row], dtype=torch.long)
            body(**batch.model_inputs())
            if progress is not None:
                progress(len(idx))
    finally:
        remove_hooks(handles)
    return {"fires": fires, "sums": sums, "maxes": maxes}
