"""The reference intervention in transformers: the compiled masks applied through site hooks.

It applies a :class:`~kn_steer.steering.masks.CompiledSteering` with the same multiply-add as the
vLLM plugin (on neurons; on attention heads: every value of a head's output; on the residual
stream after a layer: ``h - (h . u) u + a``), so it is both the oracle the plugin is tested against
and the offline engine when
vLLM is not installed. Batches must be left-padded (all prompts end at the same position), as
``generate`` needs anyway.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kn_steer.models.families import ModelShape
from kn_steer.models.sites import ATTN_HEADS, hook_residual, hook_site, remove_hooks
from kn_steer.steering.masks import HEADS, NEURONS, RESID_ABLATE, RESID_ADD, CompiledSteering, dense_directions, dense_mask


@contextmanager
def steer(model: nn.Module, compiled: CompiledSteering, prompt_length: int) -> Iterator[None]:
    """Apply ``compiled`` while inside the block.

    ``prompt_length`` is the padded prompt length: sequence positions below it are prompt tokens,
    the rest are generated tokens fed back in. Positions come from the KV cache length, so this
    works for a single full forward and for ``generate`` alike.
    """
    if compiled.is_identity:
        yield
        return
    shape = ModelShape.from_config(model.config)
    param = next(model.parameters())
    masks = {
        kind: dense_mask(compiled.mask(kind), shape, dtype=param.dtype, device=param.device)
        for kind in ("prompt", "generated")
    }
    heads = {
        kind: dense_mask(compiled.mask(kind), shape, dtype=param.dtype, device=param.device, site=HEADS)
        for kind in ("prompt", "generated")
    }
    directions = {kind: dense_directions(compiled.mask(kind), shape, device=param.device)
                  for kind in ("prompt", "generated")}
    sites = {int(s) for kind in ("prompt", "generated") for s in compiled.mask(kind).sites}
    state: dict[str, torch.Tensor] = {}

    def track_positions(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        batch, length = ids.shape[0], ids.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + length, device=param.device)
        # canonical site rows are batch-major: row b * T + t
        state["is_prompt"] = (positions < prompt_length).repeat(batch)[:, None]

    def apply(layer: int, rows: torch.Tensor) -> torch.Tensor:
        is_prompt = state["is_prompt"]
        mul = torch.where(is_prompt, masks["prompt"][0][layer], masks["generated"][0][layer])
        add = torch.where(is_prompt, masks["prompt"][1][layer], masks["generated"][1][layer])
        return rows * mul + add

    def apply_heads(layer: int, rows: torch.Tensor) -> torch.Tensor:
        is_prompt = state["is_prompt"][:, :, None]
        mul = torch.where(is_prompt, heads["prompt"][0][layer][:, None], heads["generated"][0][layer][:, None])
        add = torch.where(is_prompt, heads["prompt"][1][layer][:, None], heads["generated"][1][layer][:, None])
        per_head = rows.reshape(rows.shape[0], shape.num_heads, -1)  # [rows, heads, head_dim]
        return (per_head * mul + add).reshape(rows.shape)

    def apply_directions(layer: int, stream: torch.Tensor) -> torch.Tensor:
        is_prompt = state["is_prompt"]
        add = torch.where(is_prompt, directions["prompt"][0][layer], directions["generated"][0][layer])
        unit = torch.where(is_prompt, directions["prompt"][1][layer], directions["generated"][1][layer])
        delta = add - (stream.float() * unit).sum(-1, keepdim=True) * unit
        return delta.to(stream.dtype)

    handles = [model.register_forward_pre_hook(track_positions, with_kwargs=True)]
    if NEURONS in sites:
        handles += hook_site(model, apply)
    if HEADS in sites:
        handles += hook_site(model, apply_heads, site=ATTN_HEADS)
    if sites & {RESID_ADD, RESID_ABLATE}:
        handles += hook_residual(model, apply_directions)
    try:
        yield
    finally:
        remove_hooks(handles)
