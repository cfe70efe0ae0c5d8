"""Compile a ``kn_steer`` spec into sparse multiply-add masks, against a model's sets and shape.

``scale f`` is ``(mul f, add 0)`` and ``clamp v`` is ``(mul 0, add v)``. Composition rule, per
neuron and per position kind (prompt tokens, generated tokens):

* scales multiply (``scale 2`` then ``scale 3`` is ``scale 6``);
* a clamp wins over every scale, whatever the order; of several clamps the last listed wins.

Directions (the residual stream after a layer), per layer and position kind: ``add`` vectors sum
(``alpha`` times each direction); one ``ablate`` direction per layer (its unit vector; the
component along it is removed before the adds: ``h - (h . u) u + sum(alpha v)``). Every added
coordinate is bounded by the server's ``max_abs_value`` after summing.

The transformers reference and the vLLM plugin both apply the compiled masks with the same
math, so they agree on what a spec means.

Positions: ``prompt`` steers the forward pass over prompt tokens, ``generated`` the pass over
tokens the model generated (fed back in), ``all`` both. The first generated token is predicted
from the last prompt token, so only ``prompt``/``all`` interventions affect it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.masks import HEADS, NEURONS, RESID_ABLATE, RESID_ADD, CompiledSteering, SparseMask
from kn_steer.steering.spec import (
    POSITION_KINDS,
    Intervention,
    PositionKind,
    SteeringSpec,
    parse_spec,
)

_SET_ARRAYS: dict[int, tuple[NeuronSet, tuple[np.ndarray, ...]]] = {}


def _set_arrays(ns: NeuronSet) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(layers, indices, per-neuron factor, per-neuron value; NaN = none) of a registered set.

    Cached per set object: big sets are compiled on every request that names them.
    """
    hit = _SET_ARRAYS.get(id(ns))
    if hit is not None and hit[0] is ns:
        return hit[1]  # type: ignore[return-value]
    nan = math.nan
    units = ns.heads if ns.heads else ns.neurons
    arrays = (
        np.fromiter((n.layer for n in units), np.int64, len(units)),
        np.fromiter((getattr(n, "head", None) if ns.heads else n.index for n in units), np.int64, len(units)),
        np.fromiter((nan if n.factor is None else n.factor for n in units), np.float64, len(units)),
        np.fromiter((nan if n.value is None else n.value for n in units), np.float64, len(units)),
    )
    if len(_SET_ARRAYS) >= 256:
        _SET_ARRAYS.pop(next(iter(_SET_ARRAYS)))
    _SET_ARRAYS[id(ns)] = (ns, arrays)
    return arrays


def lookup_set(sets: Mapping[str, NeuronSet], name: str, where: str) -> NeuronSet:
    """A served set by name; the error says whether it exists for another model."""
    if name not in sets:
        other = getattr(sets, "others", {}).get(name)
        if other is not None:
            raise SpecError(f"{where}: neuron set {name!r} was found on model {other!r}, not on the "
                            "model this server serves")
        known = ", ".join(sorted(sets)) or "none loaded"
        raise SpecError(f"{where}: unknown neuron set {name!r} (known: {known})")
    return sets[name]


def _units(iv: Intervention, shape: ModelShape, ns: NeuronSet | None = None) -> tuple[str, str, int, int]:
    """(field, unit name, units per layer, site id) of an intervention's units."""
    if iv.heads is not None or (ns is not None and ns.heads and not ns.neurons):
        return "heads", "head", shape.num_heads, HEADS
    return "neurons", "neuron", shape.intermediate_size, NEURONS


def _targets(iv: Intervention, where: str, sets: Mapping[str, NeuronSet], shape: ModelShape):
    """(layers, indices, per-unit factors, per-unit values, set) of one intervention, validated."""
    if iv.set is not None:
        ns = lookup_set(sets, iv.set, f"{where}.set")
        if ns.heads and ns.neurons:
            raise SpecError(f"{where}.set: set {iv.set!r} holds neurons and heads; kn-steer serves sets of one "
                            "kind per intervention (split it, or name its units explicitly)")
        if ns.heads and shape.num_heads <= 0:
            raise SpecError(f"{where}.set: set {iv.set!r} holds attention heads, unknown to kn-steer for this model")
        return (*_set_arrays(ns), ns)
    field, unit, width, _ = _units(iv, shape)
    if width <= 0:
        raise SpecError(f"{where}.{field}: this model's attention heads are unknown to kn-steer")
    pairs = np.asarray(getattr(iv, field) or [], dtype=np.int64).reshape(-1, 2)
    layers, indices = pairs[:, 0], pairs[:, 1]
    bad_layer = (layers < 0) | (layers >= shape.num_layers)
    bad_index = (indices < 0) | (indices >= width)
    bad = np.flatnonzero(bad_layer | bad_index)
    if bad.size:
        k = int(bad[0])
        if bad_layer[k]:
            raise SpecError(f"{where}.{field}[{k}]: layer {layers[k]} out of range 0..{shape.num_layers - 1}")
        raise SpecError(f"{where}.{field}[{k}]: {'index' if unit == 'neuron' else unit} {indices[k]} out of range "
                        f"0..{width - 1}")
    flat = layers * width + indices
    uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
    if uniq.size != flat.size:
        dup = int(uniq[np.flatnonzero(counts > 1)[0]])
        where_first = int(first[np.flatnonzero(counts > 1)[0]])
        again = int(np.flatnonzero(flat == dup)[1])
        raise SpecError(
            f"{where}.{field}[{again}]: {unit} [{dup // width}, {dup % width}] "
            f"is listed twice (also at {field}[{where_first}]); list each {unit} once per intervention "
            f"(several interventions on one {unit} compose: scales multiply, the last clamp wins)"
        )
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


Entry = tuple[np.ndarray, bool, np.ndarray, int]  # flat unit ids, is clamp, parameters, site


def _fold_sites(entries: list[Entry], shape: ModelShape, limits: RequestLimits, where: str,
                directions: list[SparseMask] = ()) -> SparseMask:
    """One mask over every site: each site's entries folded apart (neurons first, then heads, then
    the folded directions)."""
    parts = []
    for site, width, unit in ((NEURONS, shape.intermediate_size, "neuron"), (HEADS, shape.num_heads, "head")):
        mine = [(flat, clamp, param) for flat, clamp, param, s in entries if s == site]
        mask = _fold(mine, width, limits, where, unit)
        if mask.size:
            parts.append((mask, site))
    parts += [(d, int(d.sites[0])) for d in directions]
    if not parts:
        return SparseMask.empty()
    if len(parts) == 1 and parts[0][1] == NEURONS:
        return parts[0][0]
    cat = lambda name: np.concatenate([getattr(m, name) for m, _ in parts])  # noqa: E731
    return SparseMask(cat("layers"), cat("indices"), cat("mul"), cat("add"),
                      np.concatenate([np.full(m.size, site, np.uint8) for m, site in parts]))


def _fold(entries: list[tuple[np.ndarray, bool, np.ndarray]], width: int,
          limits: RequestLimits, where: str, unit: str = "neuron") -> SparseMask:
    """Fold (flat neuron ids, is clamp, parameters) in request order: scales multiply, the last
    clamp wins over everything; neurons left at exactly ``h * 1 + 0`` are dropped (free). The
    folded doses must be within ``limits`` (a product of scales can exceed each factor's limit)."""
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
    too_big = np.flatnonzero(np.abs(mul) > limits.max_abs_factor)
    if too_big.size:
        k = int(too_big[0])
        raise SpecError(
            f"{where}: the interventions scale {unit} [{int(uniq[k]) // width}, {int(uniq[k]) % width}] by "
            f"{mul[k]:.6g} in all (scales multiply), beyond this server's limit |factor| <= "
            f"{limits.max_abs_factor:g}"
        )
    keep = clamped | (mul != 1.0)
    uniq = uniq[keep]
    return SparseMask((uniq // width).astype(np.int32), (uniq % width).astype(np.int32),
                      mul[keep].astype(np.float32), add[keep].astype(np.float32))


def _dose(param: np.ndarray) -> float | dict[str, float] | None:
    """The number a response reports: one value, or the range of per-neuron values."""
    if param.size == 0:
        return None
    low, high = float(param.min()), float(param.max())
    return low if low == high else {"min": low, "max": high}


def _check_dose(param: np.ndarray, op: str, limits: RequestLimits, loc: str, iv: Intervention) -> None:
    limit = limits.max_abs_factor if op == "scale" else limits.max_abs_value
    name = "factor" if op == "scale" else "value"
    bad = np.flatnonzero(np.abs(param) > limit)
    if bad.size:
        source = f"{loc}.{name}" if getattr(iv, name) is not None else f"{loc} (set {iv.set!r}'s {name})"
        raise SpecError(f"{source}: {param[int(bad[0])]:.6g} is beyond this server's limit |{name}| <= {limit:g}")


DirEntry = tuple[int, bool, np.ndarray]  # layer, is ablation, vector (alpha applied; unit for ablation)


def _directions(iv: Intervention, loc: str, sets: Mapping[str, NeuronSet], shape: ModelShape,
                ) -> tuple[list[DirEntry], dict[str, Any]]:
    """A direction intervention's per-layer vectors, checked, and what the response reports."""
    if shape.hidden_size <= 0:
        raise SpecError(f"{loc}: this model's residual stream width is unknown to kn-steer")
    layers = list(iv.layers or [])
    bad = [l for l in layers if not 0 <= l < shape.num_layers]
    if bad:
        raise SpecError(f"{loc}.layers: {bad[:5]} out of range 0..{shape.num_layers - 1}")
    ns = None
    if iv.set is not None:
        ns = lookup_set(sets, iv.set, f"{loc}.set")
        found = [(d.layer, np.asarray(d.vector, np.float64), d.alpha) for d in ns.directions
                 if iv.layers is None or d.layer in layers]
    else:
        if len(set(layers)) != len(layers):
            raise SpecError(f"{loc}.layers: a layer is listed twice; list each layer once")
        vector = np.asarray(iv.direction, np.float64)
        found = [(l, vector, None) for l in layers]
    op = iv.op or ns.operation.op
    if op not in ("add", "ablate"):
        raise SpecError(f"{loc}.op: set {iv.set!r} holds directions, which take 'add' or 'ablate', not {op!r}")
    out: list[DirEntry] = []
    alphas, norms = [], []
    for layer, vector, own_alpha in found:
        if vector.shape[0] != shape.hidden_size:
            raise SpecError(f"{loc}.direction: {vector.shape[0]} values; this model's residual stream has "
                            f"{shape.hidden_size}")
        norm = float(np.linalg.norm(vector))
        if not norm > 0.0:
            raise SpecError(f"{loc}.direction: the vector is all zeros, it has no direction")
        norms.append(norm)
        if op == "ablate":
            out.append((int(layer), True, vector / norm))
            continue
        alpha = iv.alpha if iv.alpha is not None else own_alpha if own_alpha is not None else \
            (ns.operation.alpha if ns is not None else None)
        if alpha is None:
            raise SpecError(f"{loc}.alpha: op 'add' on set {iv.set!r} needs an alpha")
        alphas.append(alpha)
        out.append((int(layer), False, alpha * vector))
    report = {"set": iv.set, "direction": len(out), "op": op,
              "alpha": _dose(np.asarray(alphas)) if op == "add" else None,
              "norm": _dose(np.asarray(norms)), "positions": iv.positions,
              **({"layers": iv.layers} if iv.layers is not None else {})}
    return out, report


def _fold_directions(entries: list[DirEntry], shape: ModelShape, limits: RequestLimits, where: str) -> list[SparseMask]:
    """Adds summed per layer, at most one ablation per layer; as ``RESID_ADD``/``RESID_ABLATE`` units."""
    adds: dict[int, np.ndarray] = {}
    ablations: dict[int, np.ndarray] = {}
    for layer, ablate, vector in entries:
        if ablate:
            if layer in ablations and not np.array_equal(ablations[layer], vector):
                raise SpecError(f"{where}: two different directions are ablated at layer {layer}; kn-steer "
                                "removes one direction per layer and position kind")
            ablations[layer] = vector
        else:
            adds[layer] = adds.get(layer, 0.0) + vector
    parts = []
    for site, table in ((RESID_ADD, adds), (RESID_ABLATE, ablations)):
        layers, indices, values = [], [], []
        for layer in sorted(table):
            vec = table[layer]
            if site == RESID_ADD:
                too_big = np.flatnonzero(np.abs(vec) > limits.max_abs_value)
                if too_big.size:
                    k = int(too_big[0])
                    raise SpecError(f"{where}: the directions add {vec[k]:.6g} to coordinate {k} of layer {layer}'s "
                                    f"residual stream in all, beyond this server's limit |value| <= "
                                    f"{limits.max_abs_value:g}")
            nz = np.flatnonzero(vec)
            layers.append(np.full(nz.size, layer, np.int32))
            indices.append(nz.astype(np.int32))
            values.append(vec[nz].astype(np.float32))
        if layers:
            n = sum(a.size for a in layers)
            parts.append(SparseMask(np.concatenate(layers), np.concatenate(indices),
                                    np.full(n, 1.0 if site == RESID_ADD else 0.0, np.float32),
                                    np.concatenate(values), np.full(n, site, np.uint8)))
    return parts


def compile_spec(
    spec: SteeringSpec | Mapping[str, Any] | str,
    sets: Mapping[str, NeuronSet],
    shape: ModelShape,
    limits: RequestLimits | None = None,
    where: str = "kn_steer",
) -> CompiledSteering:
    """Resolve names, check ranges, sizes and doses, and fold interventions into two sparse masks.

    Vectorized (numpy): a spec over every neuron of the model compiles in milliseconds.
    """
    limits = limits or RequestLimits()
    spec = parse_spec(spec, where)
    if spec.experiment is not None:
        raise SpecError(f"{where}.experiment: experiments are resolved by the A/B layer, not here")
    if spec.preset is not None:
        raise SpecError(f"{where}.preset: presets are expanded by the server (kn_steer.steering.presets), not here")
    if len(spec.interventions) > limits.max_interventions:
        raise SpecError(f"{where}.interventions: {len(spec.interventions)} interventions, more than this "
                        f"server's limit of {limits.max_interventions}")
    entries: dict[PositionKind, list[Entry]] = {k: [] for k in POSITION_KINDS}
    directions: dict[PositionKind, list[DirEntry]] = {k: [] for k in POSITION_KINDS}
    applied: list[dict[str, Any]] = []
    touched: list[np.ndarray] = []
    for n_iv, iv in enumerate(spec.interventions):
        loc = f"{where}.interventions[{n_iv}]"
        if iv.direction is not None or (iv.set is not None and lookup_set(sets, iv.set, f"{loc}.set").directions):
            found, report = _directions(iv, loc, sets, shape)
            for kind in POSITION_KINDS if iv.positions == "all" else (iv.positions,):
                directions[kind].extend(found)
            applied.append(report)
            continue
        layers, indices, factors, values, ns = _targets(iv, loc, sets, shape)
        if iv.layers is not None:
            bad = [l for l in iv.layers if not 0 <= l < shape.num_layers]
            if bad:
                raise SpecError(f"{loc}.layers: {bad[:5]} out of range 0..{shape.num_layers - 1}")
            keep = np.isin(layers, iv.layers)
            layers, indices, factors, values = layers[keep], indices[keep], factors[keep], values[keep]
        op = iv.op or (ns.operation.op if ns is not None else None)
        if op not in ("scale", "clamp"):
            raise SpecError(f"{loc}.op: {op!r} acts on directions; {'set ' + repr(iv.set) if ns else 'these units'} "
                            "take 'scale' or 'clamp'")
        if iv.alpha is not None:
            raise SpecError(f"{loc}.alpha: 'alpha' belongs to op 'add' on a direction")
        if iv.op is None and (iv.factor if op == "clamp" else iv.value) is not None:
            given = "factor" if op == "clamp" else "value"
            raise SpecError(f"{loc}.{given}: set {iv.set!r}'s default operation is {op!r}, which takes "
                            f"{'value' if op == 'clamp' else 'factor'}; give 'op' to change the operation")
        if op == "scale":
            default = ns.operation.factor if ns is not None and ns.operation.op == "scale" else None
            param = _per_neuron(iv.factor, factors, default, f"{loc}.factor: op 'scale' on set {iv.set!r} needs a factor")
        else:
            default = ns.operation.value if ns is not None and ns.operation.op == "clamp" else None
            param = _per_neuron(iv.value, values, default, f"{loc}.value: op 'clamp' on set {iv.set!r} needs a value")
        _check_dose(param, op, limits, loc, iv)
        field, _, width, site = _units(iv, shape, ns)
        flat = layers * width + indices
        touched.append(flat + (shape.num_neurons if site == HEADS else 0))  # one id space over both sites
        if sum(t.size for t in touched) > limits.max_neurons:  # cheap bound first, exact count below
            distinct = np.unique(np.concatenate(touched)).size
            if distinct > limits.max_neurons:
                what = "neurons" if all(a.get("heads") is None for a in applied) and site == NEURONS else \
                    "units (neurons and heads)"
                raise SpecError(f"{where}: {distinct} distinct {what} requested, more than this server's "
                                f"limit of {limits.max_neurons}")
        for kind in POSITION_KINDS if iv.positions == "all" else (iv.positions,):
            entries[kind].append((flat, op == "clamp", param, site))
        applied.append({
            "set": iv.set, field: int(len(layers)), "op": op,
            "factor": _dose(param) if op == "scale" else None,
            "value": _dose(param) if op == "clamp" else None,
            "positions": iv.positions, **({"layers": iv.layers} if iv.layers is not None else {}),
        })
    masks = [_fold_sites(entries[kind], shape, limits, where, _fold_directions(directions[kind], shape, limits, where))
             for kind in POSITION_KINDS]
    return CompiledSteering(masks[0], masks[1], applied)
