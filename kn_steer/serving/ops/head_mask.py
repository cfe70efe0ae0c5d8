"""Head masks: every value of an attention head's output becomes ``z * mul[slot, head] + add[slot, head]``.

The site is the input of the attention's output projection (``attn.heads``): ``[tokens, heads *
head_dim]``, heads in order, this rank's heads under tensor parallelism (vLLM splits the output
projection's input by heads, as it splits the neurons). The bank, the slots and the finite guard
are the neuron masks' (:mod:`.neuron_mask`), one multiply-add per head instead of per neuron, so
a request without head interventions reads the identity slot here too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kn_steer.serving.ops.neuron_mask import NeuronMaskOp
from kn_steer.steering.masks import HEADS


class HeadMaskOp(NeuronMaskOp):
    """Per-slot multiply-add rows for the attention heads of this worker's layers."""

    site = "attn.heads"
    site_id = HEADS

    def __init__(self, layers: Sequence[int], local_heads: int, head_offset: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, guard: float):
        super().__init__(layers, local_heads, head_offset, capacity, dtype, device, guard)
        self.head_dim = int(head_dim)

    def apply(self, layer: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        row = self._row[layer]
        per_head = x.reshape(x.shape[0], self.local_size, self.head_dim)
        mul = self.mul[row].index_select(0, slots).unsqueeze(-1)
        add = self.add[row].index_select(0, slots).unsqueeze(-1)
        y = (per_head * mul + add).reshape(x.shape)
        return torch.nan_to_num(y, nan=0.0, posinf=self.guard, neginf=-self.guard)
