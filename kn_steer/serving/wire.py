"""The wire format between the API edge and the workers: the only module that spells it.

A request's compiled masks travel inside ``SamplingParams.extra_args[WIRE_KEY]`` as raw
little-endian bytes (cheap to copy, msgpack and pickle whatever the neuron count); the client's
own spec (or, after compilation, a summary of it) sits under ``RAW_KEY``. ``WIRE_VERSION`` goes
into vLLM's ``additional_config`` so compile caches and processes of other versions never mix.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

from kn_steer.steering.masks import CompiledSteering, SparseMask
from kn_steer.steering.read import ReadPlan

RAW_KEY = "kn_steer"
WIRE_KEY = "kn_steer_compiled"
READ_KEY = "kn_steer_read_key"  # the API edge's key under which the workers keep a request's reads
GROUP_KEY = "kn_steer_group"  # the A/B arm the API edge drew (live statistics count per arm)
#: offline engines only (the HTTP edge strips it): a group per prompt token for the live statistics
TOKEN_GROUPS_KEY = "kn_steer_token_groups"
ENGINE_KEYS = (RAW_KEY, WIRE_KEY, READ_KEY, GROUP_KEY, TOKEN_GROUPS_KEY)  # never passed on as a client's own
WIRE_VERSION = "kn-steer-5"
SALT_PREFIX = "kn-steer:"


def encode_mask(mask: SparseMask) -> dict[str, bytes]:
    return {"l": mask.layers.astype("<i4").tobytes(), "i": mask.indices.astype("<i4").tobytes(),
            "m": mask.mul.astype("<f4").tobytes(), "a": mask.add.astype("<f4").tobytes(),
            "s": mask.sites.astype("u1").tobytes()}


def decode_mask(wire: Mapping[str, Any]) -> SparseMask:
    def arr(value: Any, dtype: str) -> np.ndarray:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return np.frombuffer(value, dtype=dtype).astype(dtype[1:], copy=True)
        return np.asarray(value, dtype=dtype[1:])

    layers = arr(wire["l"], "<i4")
    sites = arr(wire["s"], "|u1") if "s" in wire else np.zeros(layers.shape[0], np.uint8)
    return SparseMask(layers, arr(wire["i"], "<i4"), arr(wire["m"], "<f4"), arr(wire["a"], "<f4"), sites)


def encode(compiled: CompiledSteering) -> dict[str, Any]:
    """What the engine needs: the two masks and their keys (never the spec or the report). The
    scheduler's admission control reads only the keys."""
    return {"prompt": encode_mask(compiled.prompt), "generated": encode_mask(compiled.generated),
            "keys": [m.key() if m.size else None for m in (compiled.prompt, compiled.generated)]}


def mask_keys(wire: Mapping[str, Any] | None) -> frozenset[str]:
    """The distinct non-identity mask keys of a request (empty: unsteered)."""
    if not wire:
        return frozenset()
    return frozenset(k for k in wire.get("keys", ()) if k)


def decode(wire: Mapping[str, Any]) -> CompiledSteering:
    return CompiledSteering(decode_mask(wire["prompt"]), decode_mask(wire["generated"]))


def encode_read(plan: ReadPlan, key: str, n_prompt: int, max_tokens: int) -> dict[str, Any]:
    """A request's read-back for the workers: its key, neurons, positions, reduction, row bound."""
    return {"key": key, "l": plan.layers.astype("<i4").tobytes(), "i": plan.indices.astype("<i4").tobytes(),
            "positions": plan.positions, "reduce": plan.reduce, "n_prompt": int(n_prompt),
            "rows": plan.rows(n_prompt, max_tokens)}


def decode_read(wire: Mapping[str, Any]) -> tuple[str, ReadPlan, int, int] | None:
    """(key, plan, prompt length, row bound) of a request's read-back, or None."""
    read = wire.get("read") if wire else None
    if not read:
        return None
    plan = ReadPlan(np.frombuffer(read["l"], "<i4").astype(np.int32), np.frombuffer(read["i"], "<i4").astype(np.int32),
                    read["positions"], read["reduce"], "float32")
    return str(read["key"]), plan, int(read["n_prompt"]), int(read["rows"])


def encode_token_groups(labels: Any, index: Any, n_prompt: int) -> dict[str, Any]:
    """Check and pack ``{"labels": [str, ...], "index": [label index per prompt position]}``.

    Raises ValueError naming what is wrong (a caller's mistake, refused before the engine)."""
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ValueError("token groups: 'labels' must be a non-empty list of non-empty strings")
    idx = np.asarray(index)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("token groups: 'index' must be a list of label indices, one per prompt token")
    if idx.size > n_prompt:
        raise ValueError(f"token groups: {idx.size} indices for a prompt of {n_prompt} tokens")
    if idx.min() < 0 or idx.max() >= len(labels):
        raise ValueError(f"token groups: indices must lie in [0, {len(labels)})")
    return {"labels": [str(x) for x in labels], "index": idx.astype("<i4").tobytes()}


def decode_token_groups(wire: Mapping[str, Any] | None) -> tuple[list[str], np.ndarray] | None:
    found = wire.get("token_groups") if wire else None
    if not found:
        return None
    return list(found["labels"]), np.frombuffer(found["index"], "<i4").astype(np.int64)


def cache_salt(compiled: CompiledSteering, existing: str | None = None, unique: str | None = None) -> str:
    """Prefix-cache salt: KV blocks computed under one spec are never reused by another.

    ``existing``: a salt the client already set; both are folded into one. ``unique``: a key of
    this request alone (a request that reads prompt positions must compute every prompt token)."""
    ours = SALT_PREFIX + hashlib.sha256(
        (compiled.prompt.key() + "/" + compiled.generated.key() + "/" + (unique or "")).encode()
    ).hexdigest()[:32]
    if not existing:
        return ours
    return SALT_PREFIX + hashlib.sha256(f"{existing}\0{ours}".encode()).hexdigest()[:32]
