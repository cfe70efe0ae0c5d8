"""Compiled steering: per-neuron multiply-add masks, one per position kind.

Every intervention becomes ``h[i] <- h[i] * mul[i] + add[i]`` on the neuron vector ``h``. A
:class:`SparseMask` lists only the touched neurons; :class:`CompiledSteering` holds the prompt
and generated masks of one request and what the response reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kn_steer.models.families import ModelShape

PositionKind = Literal["prompt", "generated"]
POSITION_KINDS: tuple[PositionKind, ...] = ("prompt", "generated")


@dataclass(frozen=True)
class SparseMask:
    """Neurons whose activation becomes ``h * mul + add``; every other neuron is untouched."""

    layers: np.ndarray  # int32
    indices: np.ndarray  # int32
    mul: np.ndarray  # float32
    add: np.ndarray  # float32

    @property
    def size(self) -> int:
        return int(self.layers.shape[0])

    def key(self) -> str:
        digest = hashlib.sha256()
        for arr in (self.layers, self.indices, self.mul, self.add):
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()[:24]

    @classmethod
    def empty(cls) -> "SparseMask":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32))


@dataclass(frozen=True)
class CompiledSteering:
    """A spec resolved against the registry and model shape: one mask per position kind."""

    prompt: SparseMask
    generated: SparseMask
    applied: list[dict[str, Any]] = field(default_factory=list)  # what a response reports

    @property
    def is_identity(self) -> bool:
        return self.prompt.size == 0 and self.generated.size == 0

    def mask(self, kind: PositionKind) -> SparseMask:
        return self.prompt if kind == "prompt" else self.generated

    @classmethod
    def identity(cls) -> "CompiledSteering":
        return cls(SparseMask.empty(), SparseMask.empty())


def dense_mask(mask: SparseMask, shape: ModelShape, dtype=None, device=None):
    """(mul, add) as dense ``[layers, intermediate]`` tensors (identity where untouched)."""
    import torch

    dtype = dtype or torch.float32
    mul = torch.ones(shape.num_layers, shape.intermediate_size, dtype=dtype, device=device)
    add = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=dtype, device=device)
    if mask.size:
        l = torch.as_tensor(mask.layers, dtype=torch.long, device=device)
        i = torch.as_tensor(mask.indices, dtype=torch.long, device=device)
        mul[l, i] = torch.as_tensor(mask.mul, device=device).to(dtype)
        add[l, i] = torch.as_tensor(mask.add, device=device).to(dtype)
    return mul, add
