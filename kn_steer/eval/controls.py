"""Random-neuron (and random-head) controls, and the neuron-list interventions every protocol applies.

A control is a random neuron list of the same size as the set, given the same dose (the same
operation). Two kinds:

* ``matched`` — the same number of neurons **in each layer** as the set. Sets found by
  attribution crowd into a few layers (most of a MemoTrap set sits in the last layer); a uniform
  control then tests a different intervention, since late layers act more directly on the output.
* ``uniform`` — the same total drawn uniformly over every layer and unit.

Controls never contain the set's own neurons. Seeds are explicit, so every run draws the same
controls.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

import numpy as np

from kn_steer.models.families import ModelShape
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering

ControlKind = Literal["matched", "uniform"]
CONTROL_KINDS: tuple[str, ...] = ("matched", "uniform")
Pair = tuple[int, int]


def layer_counts(neurons: Sequence[Pair]) -> dict[int, int]:
    """Neurons per layer (what a matched control copies)."""
    return dict(sorted(Counter(l for l, _ in neurons).items()))


def uniform_neurons(count: int, shape: ModelShape, seed: int, exclude: Sequence[Pair] = ()) -> list[Pair]:
    """``count`` distinct neurons uniform over all layers and units, none of ``exclude``."""
    width = shape.intermediate_size
    taken = np.array(sorted(l * width + i for l, i in set(exclude)), dtype=np.int64)
    pool = np.setdiff1d(np.arange(shape.num_layers * width, dtype=np.int64), taken, assume_unique=True)
    if count > pool.size:
        raise ValueError(f"cannot draw {count} neurons from {pool.size} free ones")
    flat = np.random.default_rng(seed).choice(pool, size=count, replace=False)
    return [(int(f) // width, int(f) % width) for f in flat]


def matched_neurons(neurons: Sequence[Pair], shape: ModelShape, seed: int) -> list[Pair]:
    """As many random neurons per layer as ``neurons`` has there, none of ``neurons`` itself."""
    rng = np.random.default_rng(seed)
    per_layer = Counter(l for l, _ in neurons)
    own: dict[int, set[int]] = {}
    for l, i in neurons:
        own.setdefault(l, set()).add(i)
    out: list[Pair] = []
    for layer in sorted(per_layer):
        free = np.setdiff1d(np.arange(shape.intermediate_size), np.array(sorted(own[layer])), assume_unique=True)
        if per_layer[layer] > free.size:
            raise ValueError(f"layer {layer}: cannot draw {per_layer[layer]} neurons from {free.size} free ones")
        out += [(layer, int(i)) for i in rng.choice(free, size=per_layer[layer], replace=False)]
    return out


def _head_units(shape: ModelShape) -> ModelShape:
    """The model seen with its attention heads as the units of each layer."""
    return ModelShape(shape.num_layers, shape.num_heads)


def control_heads(kind: str, heads: Sequence[Pair], shape: ModelShape, seed: int) -> list[Pair]:
    """One control of ``kind`` for the ``(layer, head)`` set ``heads``: drawn as neurons are, with
    the heads as the units of each layer."""
    return control_neurons(kind, heads, _head_units(shape), seed)


def control_neurons(kind: str, neurons: Sequence[Pair], shape: ModelShape, seed: int) -> list[Pair]:
    """One control of ``kind`` for the set ``neurons``."""
    if kind == "matched":
        return matched_neurons(neurons, shape, seed)
    if kind == "uniform":
        return uniform_neurons(len(neurons), shape, seed, exclude=neurons)
    raise ValueError(f"unknown control kind {kind!r}; known: {', '.join(CONTROL_KINDS)}")


def neuron_spec(neurons: Sequence[Pair], op: str, factor: float | None = None,
                value: float | None = None) -> dict[str, Any] | None:
    """A ``kn_steer`` spec applying one operation to ``neurons`` at every position (None: none)."""
    if not neurons:
        return None
    iv: dict[str, Any] = {"neurons": [list(p) for p in neurons], "op": op}
    if op == "scale":
        iv["factor"] = factor
    else:
        iv["value"] = value
    return {"interventions": [iv]}


def compiled_for(neurons: Sequence[Pair], shape: ModelShape, op: str, factor: float | None = None,
                 value: float | None = None) -> CompiledSteering | None:
    spec = neuron_spec(neurons, op, factor, value)
    return None if spec is None else compile_spec(spec, {}, shape)


def deactivation(neurons: Sequence[Pair], shape: ModelShape) -> CompiledSteering | None:
    """Clamp ``neurons`` to 0 at every position."""
    return compiled_for(neurons, shape, "clamp", value=0.0)
