"""Reading activations back: every neuron's activation (or the residual stream after every layer)
at each prompt's last token, batched, and every neuron's mean activation over whole texts.

Prompts are tokenized as at inference (:func:`kn_steer.tokens.prompt_ids`) and left-padded with
position ids that skip the padding, so padding changes nothing and every prompt's last token sits
at the last position. One forward per batch records all layers at once through
:func:`kn_steer.models.sites.hook_site` (the canonical ``[rows, units]`` view, whatever the
family's layout).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_residual, hook_site, remove_hooks
from kn_steer.tokens import pad_id, prompt_ids


@dataclass
class PaddedBatch:
    """Left-padded prompts: ids, attention mask and position ids, all ``[B, width]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def left_padded(tokenizer: Any, prompts: Sequence[str], device: torch.device | str = "cpu") -> PaddedBatch:
    """Prompts as one left-padded batch (:func:`kn_steer.tokens.prompt_ids` per prompt)."""
    return left_padded_ids([prompt_ids(tokenizer, p) for p in prompts], pad_id(tokenizer), device)


def left_padded_ids(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> PaddedBatch:
    """Token-id rows as one left-padded batch, position ids skipping the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row))
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), positions.to(device))


def length_batches(prompts: Sequence[str], size: int) -> Iterator[list[int]]:
    """Indices of ``prompts`` in batches of similar length (less padding); every index once."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), size):
        yield order[start:start + size]


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: only the last position's logits are needed."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def _last_token_rows(model: nn.Module, tokenizer: Any, prompts: Sequence[str], units: int, install: Callable[..., list],
                     batch_size: int, dtype: torch.dtype, progress: Callable[[int], None] | None) -> torch.Tensor:
    """``[N, layers, units]``: a site's values at each prompt's last token (``install(model, record)``
    hooks the site on every layer and returns the handles)."""
    num_layers = ModelShape.from_config(model.config).num_layers
    device = next(model.parameters()).device
    out = torch.empty(len(prompts), num_layers, units, dtype=dtype)
    current: dict[str, torch.Tensor] = {}

    def record(layer: int, rows: torch.Tensor) -> None:
        acts = current["acts"]
        # canonical rows are batch-major ([B*T, U] -> [B, T, U]); left padding puts every
        # prompt's last token at the last position
        acts[:, layer] = rows.reshape(acts.shape[0], -1, rows.shape[-1])[:, -1].to(dtype).cpu()

    handles = install(model, record)
    try:
        for idx in length_batches(prompts, batch_size):
            batch = left_padded(tokenizer, [prompts[i] for i in idx], device)
            current["acts"] = torch.empty(len(idx), num_layers, units, dtype=dtype)
            model(**batch.model_inputs(), **last_logits_only(model))
            out[torch.tensor(idx)] = current["acts"]
            if progress is not None:
                progress(len(idx))
    finally:
        remove_hooks(handles)
    return out


def last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``[N, layers * units]``: every neuron's activation at each prompt's last token."""
    units = ModelShape.from_config(model.config).intermediate_size
    out = _last_token_rows(model, tokenizer, prompts, units, hook_site, batch_size, dtype, progress)
    return out.reshape(len(prompts), -1)


def last_token_streams(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``[N, layers, hidden]`` float32: the residual stream after every layer at each prompt's last token."""
    hidden = ModelShape.from_config(model.config).hidden_size
    return _last_token_rows(model, tokenizer, prompts, hidden, hook_residual, batch_size, torch.float32, progress)


@torch.no_grad()
def mean_activations(model: Any, tokenizer: Any, texts: Sequence[str], layers: Sequence[int],
                     max_tokens: int = 64) -> dict[int, torch.Tensor]:
    """Per layer, every neuron's mean activation over all tokens of ``texts`` (one text per forward:
    no padding to mask)."""
    sums = {layer: None for layer in layers}
    count = 0

    def record(layer: int, rows: torch.Tensor) -> None:
        total = rows.float().sum(0)
        sums[layer] = total if sums[layer] is None else sums[layer] + total

    handles = hook_site(model, record, layers=list(layers))
    try:
        device = next(model.parameters()).device
        for text in texts:
            ids = prompt_ids(tokenizer, text)[:max_tokens]
            model(input_ids=torch.tensor([ids], device=device))
            count += len(ids)
    finally:
        remove_hooks(handles)
    return {layer: total / count for layer, total in sums.items()}
