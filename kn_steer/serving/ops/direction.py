"""Residual-stream directions: the stream after a layer becomes ``h - (h . u[slot]) u[slot] + a[slot]``.

The site is the decoder layer's output (``resid.post``). Two banks per worker, ``[local layers,
slots, hidden]``: ``a`` the summed added vectors and ``u`` the unit vector to ablate (zero: none).
Both are zero in the identity slot, where the delta is exactly zero, so an unsteered token's stream
is bit for bit what it was. Under tensor parallelism the residual stream is whole on every rank
(vLLM all-reduces before it), so every rank holds and applies whole vectors. The banks and the
projection are float32 whatever the model's dtype: a bfloat16 unit vector would leave a visible
part of the component it should remove. Only the delta is made finite (the neuron masks' guard).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kn_steer.serving.ops.neuron_mask import bank_positions, layer_rows
from kn_steer.serving.uploads import Uploader
from kn_steer.steering.masks import RESID_ABLATE, RESID_ADD, SparseMask


class DirectionOp:
    """Per-slot added vector and ablated unit vector for the residual stream of this worker's layers."""

    site = "resid.post"

    def __init__(self, layers: Sequence[int], hidden: int, capacity: int, device: torch.device | str, guard: float):
        self.layers, self._row, self._row_of = layer_rows(layers)
        self.local_size, self.offset, self.capacity = int(hidden), 0, int(capacity)
        shape = (len(self.layers), self.capacity, self.local_size)
        self.add = torch.zeros(shape, dtype=torch.float32, device=device)
        self.unit = torch.zeros(shape, dtype=torch.float32, device=device)
        self.guard = float(guard)

    @property
    def nbytes(self) -> int:
        return 2 * self.add.numel() * self.add.element_size()

    def apply(self, layer: int, stream: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """What to add to ``stream`` ([tokens, hidden]); traced into the compiled graph as is."""
        row = self._row[layer]
        unit = self.unit[row].index_select(0, slots)
        along = (stream.float() * unit).sum(-1, keepdim=True)
        delta = self.add[row].index_select(0, slots) - along * unit
        return torch.nan_to_num(delta, nan=0.0, posinf=self.guard, neginf=-self.guard).to(stream.dtype)

    def write(self, slot: int, mask: SparseMask, uploader: Uploader, clear: bool = False) -> None:
        """Put ``mask``'s direction units into ``slot`` (or zero them there: ``clear``)."""
        for site, bank in ((RESID_ADD, self.add), (RESID_ABLATE, self.unit)):
            part = mask.of_site(site)
            flat, local = bank_positions(part, self._row_of, 0, self.local_size, self.capacity, slot)
            if flat is None:
                continue
            values = np.zeros(flat.shape[0], np.float32) if clear else part.add[local]
            bank.view(-1).index_copy_(0, uploader.to_device(flat), uploader.to_device(values).to(bank.dtype))

    def fill(self, slot: int, layer: int, value: float) -> None:
        """Add ``value`` to every coordinate of ``layer``'s stream in ``slot`` (the self-check's probe)."""
        self.add[self._row[layer], slot].fill_(value)

    def reset_slot(self, slot: int) -> None:
        self.add[:, slot].zero_()
        self.unit[:, slot].zero_()

    def reset(self) -> None:
        self.add.zero_()
        self.unit.zero_()
