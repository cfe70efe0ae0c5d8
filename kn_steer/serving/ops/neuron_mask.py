"""Neuron masks: ``h <- h * mul[slot] + add[slot]`` on the MLP neuron site, made finite.

Tensors are allocated once per worker (``[local layers, slots, local neurons]``, this rank's
slice under tensor parallelism, this stage's layers under pipeline parallelism) and only ever
updated in place, so a graph traced or captured once keeps reading the current masks: the math
always runs, specs never trigger recompilation, and an unsteered token reads slot 0 (identity).

``torch.nan_to_num`` after the multiply-add is the guard of issue #10: nothing non-finite ever
leaves a steered layer. Identity rows leave finite activations bit-identical, so unsteered tokens
are unchanged. It is elementwise, so Inductor can fuse it with the multiply-add (the fusion of the
multiply-add itself was checked in generated code; with the guard, only its cost was measured).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kn_steer.serving.uploads import Uploader
from kn_steer.steering.masks import NEURONS, SparseMask


def layer_rows(layers: Sequence[int]) -> tuple[list[int], dict[int, int], np.ndarray]:
    """A bank's layers sorted, each layer's row, and a lookup array (layer -> row, -1: not here)."""
    ordered = sorted(layers)
    row_of = np.full(max(ordered) + 1 if ordered else 1, -1, dtype=np.int64)
    row_of[ordered] = np.arange(len(ordered))
    return ordered, {layer: i for i, layer in enumerate(ordered)}, row_of


def bank_positions(mask: SparseMask, row_of: np.ndarray, offset: int, local_size: int, capacity: int, slot: int
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """Flat positions in a ``[layers, slots, units]`` bank of ``mask``'s units that this worker
    holds (its layers, its ``[offset, offset + local_size)`` slice), and which units those are;
    (None, ...) when it holds none."""
    layers = mask.layers.astype(np.int64)
    in_range = layers < row_of.shape[0]
    rows = np.where(in_range, row_of[np.minimum(layers, row_of.shape[0] - 1)], -1)
    local = (rows >= 0) & (mask.indices >= offset) & (mask.indices < offset + local_size)
    if not local.any():
        return None, local
    flat = (rows[local] * capacity + slot) * local_size + (mask.indices[local].astype(np.int64) - offset)
    return flat, local


class NeuronMaskOp:
    """Per-slot multiply-add rows for the neurons of this worker's layers (a mask's other sites'
    units are left to their own operations)."""

    site = "mlp.neurons"
    site_id = NEURONS

    def __init__(self, layers: Sequence[int], local_size: int, offset: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, guard: float):
        self.layers, self._row, self._row_of = layer_rows(layers)
        self.local_size, self.offset, self.capacity = local_size, offset, capacity
        shape = (len(self.layers), capacity, local_size)
        self.mul = torch.ones(shape, dtype=dtype, device=device)
        self.add = torch.zeros(shape, dtype=dtype, device=device)
        self.guard = float(guard)

    @property
    def nbytes(self) -> int:
        return 2 * self.mul.numel() * self.mul.element_size()

    def apply(self, layer: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The layer math, traced into the compiled graph as is (``slots``: one per row of ``x``)."""
        row = self._row[layer]
        y = x * self.mul[row].index_select(0, slots) + self.add[row].index_select(0, slots)
        return torch.nan_to_num(y, nan=0.0, posinf=self.guard, neginf=-self.guard)

    def write(self, slot: int, mask: SparseMask, uploader: Uploader, clear: bool = False) -> None:
        """Put ``mask``'s units of this site into ``slot`` (or restore identity there: ``clear``)."""
        mask = mask.of_site(self.site_id)
        flat, local = bank_positions(mask, self._row_of, self.offset, self.local_size, self.capacity, slot)
        if flat is None:
            return
        if clear:
            mul = np.ones(flat.shape[0], dtype=np.float32)
            add = np.zeros(flat.shape[0], dtype=np.float32)
        else:
            mul, add = mask.mul[local], mask.add[local]
        index = uploader.to_device(flat)
        self.mul.view(-1).index_copy_(0, index, uploader.to_device(mul).to(self.mul.dtype))
        self.add.view(-1).index_copy_(0, index, uploader.to_device(add).to(self.add.dtype))

    def fill(self, slot: int, layer: int, value: float) -> None:
        """Clamp every unit of ``layer`` in ``slot`` to ``value`` (the start-up self-check's probe)."""
        row = self._row[layer]
        self.mul[row, slot].zero_()
        self.add[row, slot].fill_(value)

    def reset_slot(self, slot: int) -> None:
        self.mul[:, slot].fill_(1.0)
        self.add[:, slot].zero_()

    def reset(self) -> None:
        self.mul.fill_(1.0)
        self.add.zero_()
