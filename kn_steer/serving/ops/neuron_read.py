"""Read-back of MLP neurons inside the forward pass: per request, in mixed batches, compiled.

The site hook calls ``torch.ops.kn_steer.read_neurons(x, layer, reader)`` right after the mask
multiply-add, so what is read is what the output projection receives. The op is opaque to the
compiler (a ``torch.library`` custom op, like vLLM's own attention ops): the compiled graph calls
back into Python at every layer, and that call returns at once unless a request in this step
reads (one dictionary lookup and a list test). The op declares that it mutates ``x`` (it never
does) so that the compiler keeps it, in order, between the multiply-add and the projection.

Per step (:meth:`NeuronReader.plan`, host side, from the batch arrays the token map uses) each
reading request gets the rows of this step's tokens it wants; per layer (:meth:`record`) their
values at this rank's neurons are gathered and kept on the host: one row per position, or a
running mean / max / last. A position is recorded once: after a preemption the recomputed
positions (identical values) are skipped, so reductions never count twice.

Values wait in the worker until the API server takes them (:meth:`take`, through
``collective_rpc``) once the request has finished; entries never taken (a client that went away)
are dropped ``ttl_s`` after their request finished, and the memory held is bounded (``budget``:
a request that does not fit gets an error in its read instead of values).

The same op feeds the live statistics of watched neurons (:mod:`.neuron_stats`), when the server
keeps them. Under tensor parallelism each rank reads its own slice of neurons; the API server assembles the
columns (:mod:`kn_steer.serving.readback`). CUDA graphs would replay the op's kernels without the
Python callback, so read-back is off where vLLM captures graphs (:mod:`kn_steer.serving.engine_config`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from kn_steer.serving.ops.neuron_stats import NeuronStats
from kn_steer.steering.read import ReadPlan

_READERS: dict[int, "NeuronReader"] = {}


@torch.library.custom_op("kn_steer::read_neurons", mutates_args=("x",))
def read_neurons(x: torch.Tensor, layer: int, reader: int) -> None:
    """Record this step's reading requests' values of ``layer`` (``x``: the canonical ``[rows, units]``)."""
    found = _READERS.get(reader)
    if found is None:
        return
    if found.step:
        found.record(layer, x)
    if found.stats is not None and found.stats.n_tokens:
        found.stats.record(layer, x)


@read_neurons.register_fake
def _read_neurons_fake(x: torch.Tensor, layer: int, reader: int) -> None:
    return None


@dataclass
class ReadState:
    """One request's read-back in this worker: its local columns and what was recorded so far."""

    key: str
    plan: ReadPlan
    n_prompt: int
    rows: int
    columns: dict[int, tuple[torch.Tensor, np.ndarray]]  # layer -> (local unit indices, output columns)
    width: int  # this rank's columns
    out_columns: np.ndarray  # the plan's column of each local column
    values: np.ndarray | None = None  # [rows, width] (reduce none) or [width] (reductions)
    filled: np.ndarray | None = None  # rows recorded (reduce none)
    count: int = 0  # positions recorded (reductions)
    last_position: int = -1
    next_position: int = 0
    finished_at: float | None = None
    error: str | None = None
    neurons_key: bytes = b""  # requests reading the same neurons are gathered together
    step_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # this step's batch rows
    step_dest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their rows in ``values``

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.nbytes


class NeuronReader:
    """This worker's read-back: see the module docstring."""

    site = "mlp.neurons"

    def __init__(self, layers: Sequence[int], offset: int, local_size: int, device: torch.device | str,
                 budget: int, ttl_s: float = 600.0):
        self.layers = sorted(layers)
        self.offset, self.local_size = offset, local_size
        self.device = torch.device(device)
        self.budget, self.ttl_s = budget, ttl_s
        self.held = 0
        self.by_request: dict[str, ReadState] = {}
        self.by_key: dict[str, ReadState] = {}
        self.step: list[ReadState] = []
        self.batches: list[tuple[dict[int, tuple[torch.Tensor, np.ndarray]], torch.Tensor, list[tuple[ReadState, slice]]]] = []
        self.stats: NeuronStats | None = None  # live statistics ride the same op
        self.id = id(self)
        _READERS[self.id] = self

    def close(self) -> None:
        _READERS.pop(self.id, None)

    # ----- requests ---------------------------------------------------------------------------
    def add(self, req_id: str, key: str, plan: ReadPlan, n_prompt: int, rows: int) -> None:
        local = np.flatnonzero(np.isin(plan.layers, self.layers) & (plan.indices >= self.offset)
                               & (plan.indices < self.offset + self.local_size))
        columns: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        layers = plan.layers[local]
        for layer in np.unique(layers):
            cols = np.flatnonzero(layers == layer)  # positions within this rank's columns
            units = plan.indices[local[cols]].astype(np.int64) - self.offset
            columns[int(layer)] = (torch.from_numpy(units).to(self.device), cols)
        state = ReadState(key, plan, n_prompt, rows, columns, int(local.size), local.astype(np.int32),
                          neurons_key=plan.layers.tobytes() + plan.indices.tobytes())
        self.by_request[req_id] = state
        self.by_key[key] = state

    def finish(self, req_id: str) -> None:
        state = self.by_request.pop(req_id, None)
        if state is not None:
            state.finished_at = time.monotonic()

    def _allocate(self, state: ReadState) -> None:
        reduced = state.plan.reduce != "none"
        shape = (state.width,) if reduced else (state.rows, state.width)
        nbytes = int(np.prod(shape)) * (8 if state.plan.reduce == "mean" else 4)
        self._expire(time.monotonic(), need=nbytes)
        if self.held + nbytes > self.budget:
            state.error = (f"this worker holds {self.held} bytes of read-back values not yet fetched; {nbytes} more "
                           f"would exceed KN_STEER_READ_MIB ({self.budget >> 20} MiB)")
            return
        fill = -np.inf if state.plan.reduce == "max" else 0.0
        state.values = np.full(shape, fill, dtype=np.float64 if state.plan.reduce == "mean" else np.float32)
        state.filled = None if reduced else np.zeros(state.rows, dtype=bool)
        self.held += state.values.nbytes

    def _expire(self, now: float, need: int = 0) -> None:
        """Drop reads never fetched ``ttl_s`` after their request finished (oldest first when short of room)."""
        done = sorted((s.finished_at, k) for k, s in self.by_key.items() if s.finished_at is not None)
        for finished_at, key in done:
            if now - finished_at < self.ttl_s and self.held + need <= self.budget:
                break
            self._drop(self.by_key[key])

    def _drop(self, state: ReadState) -> None:
        self.by_key.pop(state.key, None)
        for req_id in [r for r, s in self.by_request.items() if s is state]:  # taken before it finished
            del self.by_request[req_id]
        self.held -= state.nbytes
        state.values = None

    # ----- per step ---------------------------------------------------------------------------
    def plan(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray) -> None:
        """Which rows of this step each reading request wants (host side, before the forward)."""
        self.step, self.batches = [], []
        if not self.by_request:
            return
        start = 0
        for i, req_id in enumerate(req_ids):
            count = int(num_scheduled[i])
            state = self.by_request.get(req_id)
            if state is not None and count:
                first = int(num_computed[i])
                positions = np.arange(first, first + count, dtype=np.int64)
                rows = state.plan.row_index(positions, state.n_prompt)
                keep = (rows >= 0) & (positions >= state.next_position) & (rows < max(state.rows, 1))
                state.next_position = max(state.next_position, first + count)
                if keep.any() and state.error is None:
                    if state.values is None:
                        self._allocate(state)
                    if state.values is not None:
                        state.step_index, state.step_dest = start + np.flatnonzero(keep), rows[keep]
                        state.last_position = int(positions[keep][-1])
                        state.count += int(keep.sum())
                        if state.filled is not None:
                            state.filled[rows[keep]] = True
                        self.step.append(state)
            start += count
        self._batch()

    def _batch(self) -> None:
        """Group this step's reading requests by the neurons they read: one gather per group and layer."""
        groups: dict[bytes, list[ReadState]] = {}
        for state in self.step:
            groups.setdefault(state.neurons_key, []).append(state)
        self.batches = []
        for members in groups.values():
            bounds = np.cumsum([0] + [m.step_index.size for m in members])
            index = torch.from_numpy(np.concatenate([m.step_index for m in members])).to(self.device)
            self.batches.append((members[0].columns, index,
                                 [(m, slice(int(a), int(b))) for m, a, b in zip(members, bounds[:-1], bounds[1:])]))

    def record(self, layer: int, x: torch.Tensor) -> None:
        """Gather this layer's values for every reading request of the step (called by the op)."""
        for columns, index, members in self.batches:
            found = columns.get(layer)
            if found is None:
                continue
            units, cols = found
            gathered = x.index_select(0, index).index_select(1, units).float().cpu().numpy()
            for state, rows in members:
                got = gathered[rows]
                reduce = state.plan.reduce
                if reduce == "none":
                    state.values[np.ix_(state.step_dest, cols)] = got
                elif reduce == "mean":
                    state.values[cols] += got.sum(0, dtype=np.float64)
                elif reduce == "max":
                    state.values[cols] = np.maximum(state.values[cols], got.max(0))
                else:
                    state.values[cols] = got[-1]

    def end_step(self) -> None:
        self.step, self.batches = [], []
        if self.stats is not None:
            self.stats.n_tokens = 0  # a later dummy run counts nothing

    # ----- the start-up self-check's probe ----------------------------------------------------
    PROBE_KEY = "__kn_steer_self_check__"

    def probe(self, layer: int, tokens: int) -> ReadState:
        """Read a few of ``layer``'s neurons at the next forward's first ``tokens`` rows."""
        units = np.arange(min(4, self.local_size))
        plan = ReadPlan(np.full(units.size, layer, np.int32), (units + self.offset).astype(np.int32), "all", "none",
                        "float32")
        self.add(self.PROBE_KEY, self.PROBE_KEY, plan, tokens, tokens)
        state = self.by_key[self.PROBE_KEY]
        self._allocate(state)
        if state.values is None:
            raise RuntimeError(state.error)
        state.step_index, state.step_dest = np.arange(tokens), np.arange(tokens)
        self.step = [state]
        self._batch()
        return state

    def end_probe(self, state: ReadState) -> np.ndarray:
        """What the probe read ([tokens, neurons]); the probe is gone afterwards."""
        self.step, self.batches = [], []
        values = state.values.copy()
        self._drop(state)
        return values

    # ----- fetched by the API server ----------------------------------------------------------
    def take(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """This rank's part of each request's read (removed from the worker once taken)."""
        now = time.monotonic()
        self._expire(now)
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            state = self.by_key.get(key)
            if state is None:
                continue
            plan = state.plan
            part: dict[str, Any] = {
                "layers": plan.layers.astype("<i4").tobytes(), "indices": plan.indices.astype("<i4").tobytes(),
                "columns": state.out_columns.astype("<i4").tobytes(), "positions": plan.positions,
                "reduce": plan.reduce, "finished": state.finished_at is not None, "error": state.error,
            }
            values = state.values
            if values is not None and plan.reduce == "none":
                rows = np.flatnonzero(state.filled)
                absolute = {"prompt": rows, "all": rows, "generated": rows + state.n_prompt,
                            "last": rows + state.n_prompt - 1}[plan.positions]
                part.update(at=absolute.astype("<i4").tobytes(), values=np.ascontiguousarray(values[rows]).tobytes())
            elif values is not None:
                if plan.reduce == "mean":
                    values = values / max(state.count, 1)
                part.update(count=state.count, last_position=state.last_position,
                            values=np.ascontiguousarray(values, dtype=np.float32).tobytes())
            out[key] = part
            self._drop(state)
        return out

    def status(self) -> dict[str, Any]:
        return {"requests": len(self.by_request), "held_bytes": self.held, "waiting": len(self.by_key) - len(self.by_request)}
