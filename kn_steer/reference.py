"""The reference intervention in transformers: forward pre-hooks on each MLP output projection.

It applies a :class:`~kn_steer.spec.CompiledSteering` with the same multiply-add as the vLLM
plugin, so it is both the oracle the plugin is tested against and the offline engine when vLLM
is not installed. Batches must be left-padded (all prompts end at the same position), as
``generate`` needs anyway.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kn_steer.adapters import ModelShape, adapter_for_config, neuron_modules
from kn_steer.spec import CompiledSteering, dense_mask


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
    adapter = adapter_for_config(model.config)
    shape = ModelShape.from_config(model.config)
    param = next(model.parameters())
    masks = {
        kind: dense_mask(compiled.mask(kind), shape, dtype=param.dtype, device=param.device)
        for kind in ("prompt", "generated")
    }
    state: dict[str, torch.Tensor] = {}

    def track_positions(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        length = ids.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + length, device=param.device)
        state["is_prompt"] = (positions < prompt_length)[:, None]  # [T, 1]

    def make_hook(layer: int):
        mul_p, add_p = masks["prompt"][0][layer], masks["prompt"][1][layer]
        mul_g, add_g = masks["generated"][0][layer], masks["generated"][1][layer]

        def hook(_module, args):
            (h,) = args[:1]
            is_prompt = state["is_prompt"]
            if h.dim() == 2 and h.shape[0] != is_prompt.shape[0]:
                # OPT flattens (batch, tokens) to rows b * T + t before its MLP.
                is_prompt = is_prompt.repeat(h.shape[0] // is_prompt.shape[0], 1)
            mul = torch.where(is_prompt, mul_p, mul_g)
            add = torch.where(is_prompt, add_p, add_g)
            return (h * mul + add, *args[1:])

        return hook

    handles = [model.register_forward_pre_hook(track_positions, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_hook(l)) for l, m in enumerate(neuron_modules(model, adapter))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
