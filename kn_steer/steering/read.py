"""Read-back: which neuron values a request asks to get back, resolved against the served model.

A ``read`` (:class:`kn_steer.steering.spec.ReadSpec`) compiles into a :class:`ReadPlan`: the
neurons (the union of its sets, explicit pairs and whole layers, each once, sorted by layer then
index: the columns of the values the client gets), the positions and the reduction.

Positions, by the token fed into the forward pass (the same convention as steering's
``prompt``/``generated``): ``prompt`` is the prompt's tokens (``n_prompt`` rows), ``generated``
the generated tokens fed back (the last generated token never passes through the model, so a
request that generated ``k`` tokens has ``k - 1`` such rows), ``last`` the last prompt token (one
row: the forward pass that chose the first generated token), ``all`` both. Values are read after
the request's own steering: what the output projection receives.

The server bounds what one request may read (``max_read_values``: rows x neurons, or neurons
alone with a reduction) before anything reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.compile import lookup_set
from kn_steer.steering.spec import ReadPositions, ReadReduce, ReadSpec


@dataclass(frozen=True)
class ReadPlan:
    """A resolved ``read``: sorted unique neurons, positions and reduction."""

    layers: np.ndarray  # int32, sorted by (layer, index)
    indices: np.ndarray  # int32
    positions: ReadPositions
    reduce: ReadReduce
    dtype: str

    @property
    def size(self) -> int:
        return int(self.layers.shape[0])

    @property
    def reads_prompt(self) -> bool:
        """Whether prompt tokens are read (then the request must compute them: no prefix-cache hits)."""
        return self.positions in ("prompt", "last", "all")

    def rows(self, n_prompt: int, max_tokens: int) -> int:
        """Rows of values a request can produce at most (before any reduction)."""
        return {"prompt": n_prompt, "last": 1, "generated": max(0, max_tokens - 1),
                "all": n_prompt + max(0, max_tokens - 1)}[self.positions]

    def values_bound(self, n_prompt: int, max_tokens: int) -> int:
        """Values the response carries at most."""
        return self.size * (1 if self.reduce != "none" else self.rows(n_prompt, max_tokens))

    def check_bound(self, n_prompt: int, max_tokens: int, limits: RequestLimits, where: str = "kn_steer.read") -> None:
        bound = self.values_bound(n_prompt, max_tokens)
        if bound > limits.max_read_values:
            rows = "" if self.reduce != "none" else f" x up to {self.rows(n_prompt, max_tokens)} positions"
            raise SpecError(
                f"{where}: {self.size} neurons{rows} is {bound} values, more than this server's limit of "
                f"{limits.max_read_values} per request; read fewer neurons or positions, or reduce them "
                "('reduce': 'mean', 'max' or 'last')"
            )

    def row_index(self, positions: np.ndarray, n_prompt: int) -> np.ndarray:
        """Each absolute position's row in the unreduced values (``-1``: not read)."""
        pos = positions.astype(np.int64, copy=False)
        if self.positions == "prompt":
            return np.where(pos < n_prompt, pos, -1)
        if self.positions == "generated":
            return np.where(pos >= n_prompt, pos - n_prompt, -1)
        if self.positions == "last":
            return np.where(pos == n_prompt - 1, 0, -1)
        return pos.copy()


def compile_read(read: ReadSpec, sets: Mapping[str, NeuronSet], shape: ModelShape, limits: RequestLimits,
                 where: str = "kn_steer.read") -> ReadPlan:
    """Resolve a ``read`` against the served sets and model shape; errors name the field."""
    width = shape.intermediate_size
    parts: list[np.ndarray] = []
    for k, name in enumerate(read.sets):
        ns = lookup_set(sets, name, f"{where}.sets[{k}]")
        if not ns.neurons:
            raise SpecError(f"{where}.sets[{k}]: set {name!r} holds {ns.kind}; read-back reads MLP neurons")
        parts.append(np.fromiter((n.layer * width + n.index for n in ns.neurons), np.int64, len(ns.neurons)))
    if read.neurons:
        pairs = np.asarray(read.neurons, dtype=np.int64).reshape(-1, 2)
        bad = np.flatnonzero((pairs[:, 0] >= shape.num_layers) | (pairs[:, 1] >= width))
        if bad.size:
            k = int(bad[0])
            if pairs[k, 0] >= shape.num_layers:
                raise SpecError(f"{where}.neurons[{k}]: layer {pairs[k, 0]} out of range 0..{shape.num_layers - 1}")
            raise SpecError(f"{where}.neurons[{k}]: index {pairs[k, 1]} out of range 0..{width - 1}")
        parts.append(pairs[:, 0] * width + pairs[:, 1])
    for k, layer in enumerate(read.layers or []):
        if layer >= shape.num_layers:
            raise SpecError(f"{where}.layers[{k}]: layer {layer} out of range 0..{shape.num_layers - 1}")
    whole = len(set(read.layers or [])) * width
    if whole > limits.max_read_values:  # refused before building arrays that large
        raise SpecError(f"{where}.layers: {whole} neurons, more than this server's limit of "
                        f"{limits.max_read_values} values per request")
    parts += [np.arange(layer * width, (layer + 1) * width, dtype=np.int64) for layer in set(read.layers or [])]
    flat = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if flat.size > limits.max_read_values:
        raise SpecError(f"{where}: {flat.size} neurons, more than this server's limit of {limits.max_read_values} "
                        "values per request")
    return ReadPlan((flat // width).astype(np.int32), (flat % width).astype(np.int32), read.positions, read.reduce,
                    read.dtype)
