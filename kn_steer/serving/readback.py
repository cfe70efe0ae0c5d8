"""Read-back values from the workers to the client: take, assemble across ranks, encode, decode.

A finished request's values wait in every worker (:mod:`kn_steer.serving.ops.neuron_read`); the
API server takes them once through ``collective_rpc("kn_steer_take_reads")``, puts each rank's
columns in place and answers one object per request (the response's ``kn_steer.read``)::

    {"neurons": {"shape": [N, 2], "dtype": "int32", "data": <base64>},   # [layer, index] per column
     "positions": "prompt", "reduce": "none",
     "at": [0, 1, ...],                         # absolute token position of each row (reduce none)
     "values": {"shape": [rows, N], "dtype": "float32", "data": <base64>},
     "complete": true, "error": null}

Arrays are little-endian, row-major, base64-encoded (``dtype`` float32 or, on request, float16).
With a reduction, ``values`` has shape ``[N]`` and ``count`` says over how many positions.
:func:`decode` turns that object back into numpy arrays; :func:`read_back` does it all for an
offline ``vllm.LLM``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

TAKE_METHOD = "kn_steer_take_reads"


def _array(data: np.ndarray) -> dict[str, Any]:
    return {"shape": list(data.shape), "dtype": str(data.dtype),
            "data": base64.b64encode(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()).decode()}


def _unarray(obj: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["data"]), dtype=np.dtype(obj["dtype"]).newbyteorder("<")).reshape(obj["shape"])


def assemble(parts: Sequence[dict[str, Any]], dtype: str = "float32") -> dict[str, Any]:
    """One request's response object from every rank's part (each rank holds some columns)."""
    if not parts:
        return {"complete": False, "error": "no worker holds this request's read-back values (expired or taken)"}
    first = parts[0]
    layers = np.frombuffer(first["layers"], "<i4")
    indices = np.frombuffer(first["indices"], "<i4")
    body: dict[str, Any] = {"neurons": _array(np.stack([layers, indices], 1).astype(np.int32)),
                            "positions": first["positions"], "reduce": first["reduce"],
                            "complete": all(p["finished"] for p in parts), "error": None}
    errors = [p["error"] for p in parts if p.get("error")]
    if errors or any("values" not in p for p in parts):
        body["error"] = errors[0] if errors else "a worker recorded no values for this request"
        return body
    n = layers.shape[0]
    if first["reduce"] == "none":
        at = np.frombuffer(first["at"], "<i4")
        if any(not np.array_equal(np.frombuffer(p["at"], "<i4"), at) for p in parts[1:]):
            body["error"] = "the tensor-parallel ranks recorded different positions"
            return body
        values = np.full((at.shape[0], n), np.nan, dtype=np.float32)
        for p in parts:
            cols = np.frombuffer(p["columns"], "<i4")
            values[:, cols] = np.frombuffer(p["values"], "<f4").reshape(at.shape[0], cols.shape[0])
        body["at"] = at.tolist()
    else:
        values = np.full(n, np.nan, dtype=np.float32)
        for p in parts:
            values[np.frombuffer(p["columns"], "<i4")] = np.frombuffer(p["values"], "<f4")
        body["count"] = int(first["count"])
        body["last_position"] = int(first["last_position"])
    body["values"] = _array(values.astype(dtype))
    return body


def by_key(rank_results: Sequence[dict[str, dict[str, Any]]], keys: Sequence[str],
           dtypes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Assemble every key's read from ``collective_rpc``'s per-rank answers, in ``keys`` order."""
    dtypes = dtypes or ["float32"] * len(keys)
    return [assemble([r[key] for r in rank_results if key in r], dtype) for key, dtype in zip(keys, dtypes)]


async def take(engine: Any, keys: Sequence[str], dtypes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The reads of finished requests from an ``AsyncLLM`` (one RPC for all of them)."""
    try:
        results = await engine.collective_rpc(TAKE_METHOD, args=(list(keys),))
    except Exception as exc:  # noqa: BLE001 - the response is still worth sending
        return [{"complete": False, "error": f"the workers did not hand over the read-back values ({exc})"}
                for _ in keys]
    return by_key(list(results), keys, dtypes)


@dataclass(frozen=True)
class ReadResult:
    """One request's read-back as arrays: ``values[row, column]`` (or ``values[column]`` reduced)."""

    neurons: np.ndarray  # [N, 2] (layer, index)
    values: np.ndarray
    at: np.ndarray | None  # absolute positions of the rows (reduce none)
    positions: str
    reduce: str
    count: int | None
    complete: bool

    def column(self, layer: int, index: int) -> np.ndarray:
        hit = np.flatnonzero((self.neurons[:, 0] == layer) & (self.neurons[:, 1] == index))
        if not hit.size:
            raise KeyError(f"neuron [{layer}, {index}] was not read")
        return self.values[..., int(hit[0])]


def decode(obj: dict[str, Any]) -> ReadResult:
    """The response's ``kn_steer.read`` entry as numpy arrays (raises on an entry with an error)."""
    if obj.get("error"):
        raise ValueError(f"kn_steer.read: {obj['error']}")
    at = np.asarray(obj["at"], dtype=np.int64) if "at" in obj else None
    return ReadResult(_unarray(obj["neurons"]), _unarray(obj["values"]), at, obj["positions"], obj["reduce"],
                      obj.get("count"), bool(obj.get("complete")))


def read_back(llm: Any, outputs: Sequence[Any]) -> list[ReadResult]:
    """Offline ``vllm.LLM``: the reads of finished ``outputs`` (requests whose ``kn_steer`` had ``read``)."""
    keys = [o.request_id for o in outputs]
    results = llm.collective_rpc(TAKE_METHOD, args=(keys,))
    return [decode(obj) for obj in by_key(list(results), keys)]
