"""The ``kn_steer`` request spec and its compilation into per-neuron multiply-add masks.

Every intervention becomes ``h[i] <- h[i] * mul[i] + add[i]`` on the neuron vector ``h``:
``scale f`` is ``(f, 0)`` and ``clamp v`` is ``(0, v)``. Composition rule, applied per neuron
and per position kind (prompt tokens, generated tokens):

* scales multiply (``scale 2`` then ``scale 3`` is ``scale 6``);
* a clamp wins over every scale, whatever the order; of several clamps the last listed wins.

The transformers reference and the vLLM plugin both apply the compiled masks with the same
multiply-add, so they agree bit for bit on what a spec means.

Positions: ``prompt`` steers the forward pass over prompt tokens, ``generated`` the pass over
tokens the model generated (fed back in), ``all`` both. The first generated token is predicted
from the last prompt token, so only ``prompt``/``all`` interventions affect it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_steer.adapters import ModelShape
from kn_steer.errors import SpecError
from kn_steer.neuron_set import NeuronSet

PositionKind = Literal["prompt", "generated"]
POSITION_KINDS: tuple[PositionKind, ...] = ("prompt", "generated")
DEFAULT_MAX_NEURONS = 200_000


class Intervention(BaseModel):
    """One intervention: a named set or explicit ``[layer, index]`` pairs, and an operation."""

    model_config = ConfigDict(extra="forbid")

    set: str | None = None
    neurons: list[tuple[int, int]] | None = None
    op: Literal["scale", "clamp"] | None = None
    factor: float | None = None
    value: float | None = None
    layers: list[int] | None = None
    positions: Literal["all", "prompt", "generated"] = "all"

    @model_validator(mode="after")
    def _check(self) -> "Intervention":
        if (self.set is None) == (self.neurons is None):
            raise ValueError("give exactly one of 'set' (a neuron-set name) or 'neurons' ([[layer, index], ...])")
        for name in ("factor", "value"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"'{name}' must be a finite number, got {v}")
        if self.neurons is not None:
            if self.op is None:
                raise ValueError("explicit 'neurons' need an 'op' ('scale' or 'clamp')")
        if self.op == "scale" and self.factor is None and self.neurons is not None:
            raise ValueError("op 'scale' needs a 'factor'")
        if self.op == "clamp" and self.value is None and self.neurons is not None:
            raise ValueError("op 'clamp' needs a 'value'")
        if self.op == "scale" and self.value is not None:
            raise ValueError("op 'scale' takes 'factor', not 'value'")
        if self.op == "clamp" and self.factor is not None:
            raise ValueError("op 'clamp' takes 'value', not 'factor'")
        return self


class SteeringSpec(BaseModel):
    """The ``kn_steer`` request field: interventions, or an A/B experiment to draw an arm from."""

    model_config = ConfigDict(extra="forbid")

    interventions: list[Intervention] = Field(default_factory=list)
    experiment: str | None = None
    unit: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SteeringSpec":
        if self.experiment is not None and self.interventions:
            raise ValueError("give either 'interventions' or 'experiment', not both")
        if self.unit is not None and self.experiment is None:
            raise ValueError("'unit' is only meaningful with 'experiment'")
        return self


def parse_spec(raw: Any, where: str = "kn_steer") -> SteeringSpec:
    """Parse a spec from a dict, a model or a JSON string; errors name the offending field."""
    if isinstance(raw, SteeringSpec):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{where}: not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: expected an object, got {type(raw).__name__}")
    try:
        return SteeringSpec.model_validate(raw)
    except ValidationError as exc:
        def path(loc: tuple) -> str:  # kn_steer.interventions[0].factor, like compile_spec's errors
            return where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)

        problems = "; ".join(f"{path(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SpecError(problems) from exc


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

    def to_wire(self) -> dict[str, bytes]:
        """Raw little-endian bytes: cheap to copy, msgpack and pickle, whatever the neuron count."""
        return {"l": self.layers.astype("<i4").tobytes(), "i": self.indices.astype("<i4").tobytes(),
                "m": self.mul.astype("<f4").tobytes(), "a": self.add.astype("<f4").tobytes()}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "SparseMask":
        def arr(value: Any, dtype: str) -> np.ndarray:
            if isinstance(value, (bytes, bytearray, memoryview)):
                return np.frombuffer(value, dtype=dtype).astype(dtype[1:], copy=True)
            return np.asarray(value, dtype=dtype[1:])

        return cls(arr(wire["l"], "<i4"), arr(wire["i"], "<i4"), arr(wire["m"], "<f4"), arr(wire["a"], "<f4"))

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

    def cache_salt(self) -> str:
        """Prefix-cache salt: KV blocks computed under one spec are never reused by another."""
        return "kn-steer:" + hashlib.sha256(
            (self.prompt.key() + "/" + self.generated.key()).encode()
        ).hexdigest()[:32]

    def to_wire(self) -> dict[str, Any]:
        return {"prompt": self.prompt.to_wire(), "generated": self.generated.to_wire(),
                "applied": self.applied}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "CompiledSteering":
        return cls(SparseMask.from_wire(wire["prompt"]), SparseMask.from_wire(wire["generated"]),
                   list(wire.get("applied", [])))


_SET_ARRAYS: dict[int, tuple[NeuronSet, tuple[np.ndarray, ...]]] = {}


def _set_arrays(ns: NeuronSet) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layers, indices, per-neuron factor, per-neuron value; NaN = none) of a registered set.

    Cached per set object: big sets are compiled on every request that names them.
    """
    hit = _SET_ARRAYS.get(id(ns))
    if hit is not None and hit[0] is ns:
        return hit[1]  # type: ignore[return-value]
    nan = math.nan
    arrays = (
        np.fromiter((n.layer for n in ns.neurons), np.int64, len(ns.neurons)),
        np.fromiter((n.index for n in ns.neurons), np.int64, len(ns.neurons)),
        np.fromiter((nan if n.factor is None else n.factor for n in ns.neurons), np.float64, len(ns.neurons)),
        np.fromiter((nan if n.value is None else n.value for n in ns.neurons), np.float64, len(ns.neurons)),
    )
    if len(_SET_ARRAYS) >= 256:
        _SET_ARRAYS.pop(next(iter(_SET_ARRAYS)))
    _SET_ARRAYS[id(ns)] = (ns, arrays)
    return arrays


def _targets(iv: Intervention, where: str, sets: Mapping[str, NeuronSet], shape: ModelShape):
    """(layers, indices, per-neuron factors, per-neuron values, set) of one intervention, validated."""
    if iv.set is not None:
        if iv.set not in sets:
            known = ", ".join(sorted(sets)) or "none loaded"
            raise SpecError(f"{where}.set: unknown neuron set {iv.set!r} (known: {known})")
        ns = sets[iv.set]
        return (*_set_arrays(ns), ns)
    pairs = np.asarray(iv.neurons or [], dtype=np.int64).reshape(-1, 2)
    layers, indices = pairs[:, 0], pairs[:, 1]
    bad_layer = (layers < 0) | (layers >= shape.num_layers)
    bad_index = (indices < 0) | (indices >= shape.intermediate_size)
    bad = np.flatnonzero(bad_layer | bad_index)
    if bad.size:
        k = int(bad[0])
        if bad_layer[k]:
            raise SpecError(f"{where}.neurons[{k}]: layer {layers[k]} out of range 0..{shape.num_layers - 1}")
        raise SpecError(f"{where}.neurons[{k}]: index {indices[k]} out of range 0..{shape.intermediate_size - 1}")
    none = np.full(len(layers), math.nan)
    return layers, indices, none, none, None


def _per_neuron(given: float | None, own: np.ndarray, default: float | None, error: str) -> np.ndarray:
    """The request's number if given, else each neuron's own, else the set's default."""
    if given is not None:
        return np.full(own.shape, given)
    out = own.copy()
    missing = np.isnan(out)
    if missing.any():
        if default is None:
            raise SpecError(error)
        out[missing] = default
    return out


def _fold(entries: list[tuple[np.ndarray, bool, np.ndarray]], width: int) -> SparseMask:
    """Fold (flat neuron ids, is clamp, parameters) in request order: scales multiply, the last
    clamp wins over everything; neurons left at exactly ``h * 1 + 0`` are dropped (free)."""
    if not entries:
        return SparseMask.empty()
    flat = np.concatenate([e[0] for e in entries])
    param = np.concatenate([e[2] for e in entries])
    clamp = np.concatenate([np.full(len(e[0]), e[1]) for e in entries])
    uniq, inv = np.unique(flat, return_inverse=True)
    mul = np.ones(len(uniq))
    np.multiply.at(mul, inv[~clamp], param[~clamp])
    last = np.full(len(uniq), -1)
    np.maximum.at(last, inv[clamp], np.flatnonzero(clamp))  # position of each neuron's last clamp
    clamped = last >= 0
    add = np.where(clamped, param[np.maximum(last, 0)], 0.0)
    mul = np.where(clamped, 0.0, mul)
    keep = clamped | (mul != 1.0)
    uniq = uniq[keep]
    return SparseMask((uniq // width).astype(np.int32), (uniq % width).astype(np.int32),
                      mul[keep].astype(np.float32), add[keep].astype(np.float32))


def compile_spec(
    spec: SteeringSpec | Mapping[str, Any] | str,
    sets: Mapping[str, NeuronSet],
    shape: ModelShape,
    max_neurons: int = DEFAULT_MAX_NEURONS,
    where: str = "kn_steer",
) -> CompiledSteering:
    """Resolve names, check ranges and limits, and fold interventions into two sparse masks.

    Vectorized (numpy): a spec over every neuron of the model compiles in milliseconds.
    """
    spec = parse_spec(spec, where)
    if spec.experiment is not None:
        raise SpecError(f"{where}.experiment: experiments are resolved by the A/B layer, not here")
    width = shape.intermediate_size
    entries: dict[PositionKind, list[tuple[np.ndarray, bool, np.ndarray]]] = {k: [] for k in POSITION_KINDS}
    applied: list[dict[str, Any]] = []
    total = 0
    for n_iv, iv in enumerate(spec.interventions):
        loc = f"{where}.interventions[{n_iv}]"
        layers, indices, factors, values, ns = _targets(iv, loc, sets, shape)
        if iv.layers is not None:
            bad = [l for l in iv.layers if not 0 <= l < shape.num_layers]
            if bad:
                raise SpecError(f"{loc}.layers: {bad} out of range 0..{shape.num_layers - 1}")
            keep = np.isin(layers, iv.layers)
            layers, indices, factors, values = layers[keep], indices[keep], factors[keep], values[keep]
        op = iv.op or (ns.operation.op if ns is not None else None)
        total += len(layers)
        if total > max_neurons:
            raise SpecError(f"{where}: {total} neurons requested, more than the maximum of {max_neurons}")
        if op == "scale":
            default = ns.operation.factor if ns is not None and ns.operation.op == "scale" else None
            param = _per_neuron(iv.factor, factors, default, f"{loc}.factor: op 'scale' on set {iv.set!r} needs a factor")
        else:
            default = ns.operation.value if ns is not None and ns.operation.op == "clamp" else None
            param = _per_neuron(iv.value, values, default, f"{loc}.value: op 'clamp' on set {iv.set!r} needs a value")
        flat = layers * width + indices
        for kind in POSITION_KINDS if iv.positions == "all" else (iv.positions,):
            entries[kind].append((flat, op == "clamp", param))
        applied.append({
            "set": iv.set, "neurons": int(len(layers)), "op": op,
            "factor": iv.factor if op == "scale" else None,
            "value": iv.value if op == "clamp" else None, "positions": iv.positions,
        })
    return CompiledSteering(_fold(entries["prompt"], width), _fold(entries["generated"], width), applied)


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
