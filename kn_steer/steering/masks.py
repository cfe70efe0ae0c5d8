"""Compiled steering: per-unit multiply-add masks, one per position kind.

Every neuron or head intervention becomes ``h[i] <- h[i] * mul[i] + add[i]`` on a unit ``i`` of a
site: an MLP neuron (``mlp.neurons``), or an attention head (``attn.heads``: every value of the
head's output gets the head's ``mul`` and ``add``). A residual-stream direction (``resid.post``, a
decoder layer's output) is stored as units too, one per hidden dimension of each layer it touches:
``RESID_ADD`` units carry the vector added (``add``), ``RESID_ABLATE`` units the unit vector whose
component is removed (its coordinates, also in ``add``; ``mul`` is 0), so that a layer's stream
becomes ``h - (h . u) u + a``. A :class:`SparseMask` lists only the touched units, each with its
site (:data:`SITE_IDS`); :class:`CompiledSteering` holds the prompt and generated masks of one
request and what the response reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kn_steer.models.families import ModelShape

PositionKind = Literal["prompt", "generated"]
POSITION_KINDS: tuple[PositionKind, ...] = ("prompt", "generated")
NEURONS, HEADS, RESID_ADD, RESID_ABLATE = 0, 1, 2, 3
#: a unit's site, as stored in a mask (both direction ids live on the ``resid.post`` site)
SITE_IDS = {"mlp.neurons": NEURONS, "attn.heads": HEADS, "resid.add": RESID_ADD, "resid.ablate": RESID_ABLATE}


@dataclass(frozen=True)
class SparseMask:
    """Units whose value becomes ``h * mul + add``; every other unit is untouched. ``sites``: each
    unit's site (:data:`SITE_IDS`; all neurons when not given)."""

    layers: np.ndarray  # int32
    indices: np.ndarray  # int32
    mul: np.ndarray  # float32
    add: np.ndarray  # float32
    sites: np.ndarray | None = None  # uint8

    def __post_init__(self) -> None:
        if self.sites is None:
            object.__setattr__(self, "sites", np.zeros(self.layers.shape[0], np.uint8))

    @property
    def size(self) -> int:
        return int(self.layers.shape[0])

    def of_site(self, site: int) -> "SparseMask":
        """The units of one site id (:data:`SITE_IDS`)."""
        keep = self.sites == site
        if keep.all():
            return self
        return SparseMask(self.layers[keep], self.indices[keep], self.mul[keep], self.add[keep], self.sites[keep])

    def key(self) -> str:
        digest = hashlib.sha256()
        for arr in (self.layers, self.indices, self.mul, self.add):
            digest.update(np.ascontiguousarray(arr).tobytes())
        if self.sites.any():  # a neuron-only mask keeps the key it always had
            digest.update(b"sites" + np.ascontiguousarray(self.sites).tobytes())
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


def dense_mask(mask: SparseMask, shape: ModelShape, dtype=None, device=None, site: int = NEURONS):
    """(mul, add) of one site as dense ``[layers, units]`` tensors (identity where untouched;
    units: neurons, or heads)."""
    import torch

    dtype = dtype or torch.float32
    mask = mask.of_site(site)
    units = shape.intermediate_size if site == NEURONS else shape.num_heads
    mul = torch.ones(shape.num_layers, units, dtype=dtype, device=device)
    add = torch.zeros(shape.num_layers, units, dtype=dtype, device=device)
    if mask.size:
        l = torch.as_tensor(mask.layers, dtype=torch.long, device=device)
        i = torch.as_tensor(mask.indices, dtype=torch.long, device=device)
        mul[l, i] = torch.as_tensor(mask.mul, device=device).to(dtype)
        add[l, i] = torch.as_tensor(mask.add, device=device).to(dtype)
    return mul, add


def dense_directions(mask: SparseMask, shape: ModelShape, dtype=None, device=None):
    """(add, unit) of the residual-stream site as dense ``[layers, hidden]`` tensors (zero where
    untouched): the stream after layer ``l`` becomes ``h - (h . unit[l]) unit[l] + add[l]``."""
    import torch

    dtype = dtype or torch.float32
    out = []
    for site in (RESID_ADD, RESID_ABLATE):
        part = mask.of_site(site)
        dense = torch.zeros(shape.num_layers, shape.hidden_size, dtype=dtype, device=device)
        if part.size:
            dense[torch.as_tensor(part.layers, dtype=torch.long, device=device),
                  torch.as_tensor(part.indices, dtype=torch.long, device=device)] = \
                torch.as_tensor(part.add, device=device).to(dtype)
        out.append(dense)
    return out[0], out[1]
