"""One worker's steering state: live requests, the slot table, the operations, the token map.

The model runner integration (:mod:`kn_steer.serving.runner_v1`, :mod:`kn_steer.serving.runner_v2`)
feeds it requests and per-step batch arrays; the site hooks call :meth:`WorkerSteering.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kn_steer.serving import mapping
from kn_steer.serving.ops.direction import DirectionOp
from kn_steer.serving.ops.head_mask import HeadMaskOp
from kn_steer.serving.ops.neuron_mask import NeuronMaskOp
from kn_steer.serving.ops.neuron_read import NeuronReader
from kn_steer.serving.slots import SlotTable
from kn_steer.serving.uploads import Uploader
from kn_steer.serving.wire import decode, decode_read, decode_token_groups
from kn_steer.steering.masks import SparseMask


@dataclass
class _Request:
    prompt_key: str | None  # None: identity
    generated_key: str | None


@dataclass
class Counters:
    """What the worker has done (reported through ``kn_steer_status`` and Prometheus)."""

    steps: int = 0
    steered_steps: int = 0
    steered_tokens: int = 0
    steered_requests: int = 0
    reading_requests: int = 0
    requests_seen: int = 0


class WorkerSteering:
    """Everything a worker needs to steer: see the module docstring."""

    def __init__(self, op: NeuronMaskOp, capacity: int, max_tokens: int, device: torch.device | str,
                 reader: NeuronReader | None = None, head_op: HeadMaskOp | None = None,
                 direction_op: DirectionOp | None = None):
        self.op = op
        self.head_op = head_op
        self.direction_op = direction_op
        self.ops: list[NeuronMaskOp | DirectionOp] = [o for o in (op, head_op, direction_op) if o is not None]
        self.reader = reader
        self.table: SlotTable[SparseMask] = SlotTable(capacity)
        self.device = torch.device(device)
        self.uploader = Uploader(self.device)
        self.token_slots = torch.zeros(max_tokens, dtype=torch.long, device=self.device)
        self._host = np.zeros(max_tokens, dtype=np.int64)
        self._high_water = 0  # token_slots[high_water:] is all zero
        self._requests: dict[str, _Request] = {}
        self._seen: set[str] = set()
        self.counters = Counters()
        self.self_check: dict[str, Any] | None = None
        self.hooks: dict[int, tuple[Any, Any, Any]] = {}  # layer -> (module, hook, handle)
        self.head_hooks: dict[int, tuple[Any, Any, Any]] = {}  # the same, on the attention heads' site
        self.direction_hooks: dict[int, tuple[Any, Any, Any]] = {}  # the same, forward hooks on decoder layers

    @property
    def stats(self):
        return self.reader.stats if self.reader is not None else None

    # ----- the layer math (called by the site hooks, traced into the graph) -------------------
    def apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        y = self.op.apply(layer, x, self.token_slots[: x.shape[0]])
        if self.reader is not None:  # fixed before tracing: a server without read-back has no op in its graph
            torch.ops.kn_steer.read_neurons(y, layer, self.reader.id)
        return y

    def apply_heads(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.head_op.apply(layer, x, self.token_slots[: x.shape[0]])

    def apply_directions(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """What to add to the residual stream after ``layer`` (zero for unsteered tokens)."""
        return self.direction_op.apply(layer, stream, self.token_slots[: stream.shape[0]])

    def _write(self, slot: int, mask: SparseMask, clear: bool = False) -> None:
        for op in self.ops:
            op.write(slot, mask, self.uploader, clear=clear)

    # ----- requests ---------------------------------------------------------------------------
    def seen(self, req_id: str) -> bool:
        return req_id in self._seen

    def add_request(self, req_id: str, wire: Any | None) -> None:
        """Remember a request's masks (``wire``: its ``extra_args`` entry, or None: identity)."""
        self._seen.add(req_id)
        self.counters.requests_seen += 1
        if wire is None:
            return
        if self.stats is not None:
            self.stats.add(req_id, wire.get("group"), decode_token_groups(wire))
        read = decode_read(wire)
        if read is not None and self.reader is not None:
            self.reader.add(req_id, *read)
            self.counters.reading_requests += 1
        compiled = decode(wire)
        if compiled.is_identity:
            return
        keys = []
        for mask in (compiled.prompt, compiled.generated):
            if mask.size == 0:
                keys.append(None)
                continue
            key = mask.key()
            self.table.acquire(key, mask)
            keys.append(key)
        self._requests[req_id] = _Request(keys[0], keys[1])
        self.counters.steered_requests += 1

    def remove_request(self, req_id: str) -> None:
        self._seen.discard(req_id)
        if self.reader is not None:
            self.reader.finish(req_id)
        if self.stats is not None:
            self.stats.remove(req_id)
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        for key in (state.prompt_key, state.generated_key):
            if key is not None:
                for change in self.table.release(key):
                    self._write(change.slot, change.mask, clear=True)

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    # ----- per step ---------------------------------------------------------------------------
    def prepare_step(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                     num_prompt: np.ndarray) -> None:
        """Point every scheduled token at its request's slot (arrays per request, batch order)."""
        self.uploader.begin_step()
        self.counters.steps += 1
        num_reqs = len(req_ids)
        if self.reader is not None:
            self.reader.plan(req_ids, num_scheduled, num_computed)
        if self.stats is not None:
            self.stats.plan(req_ids, num_scheduled, num_computed)
        steered = [(i, self._requests[r]) for i, r in enumerate(req_ids) if r in self._requests]
        if not steered:
            if self._high_water:
                self.token_slots[: self._high_water].zero_()
                self._high_water = 0
            return
        keys = {k for _, s in steered for k in (s.prompt_key, s.generated_key) if k is not None}
        where, changes = self.table.place(keys)
        for change in changes:
            self._write(change.slot, change.mask, clear=change.clear)
        prompt_slot = np.zeros(num_reqs, dtype=np.int64)
        gen_slot = np.zeros(num_reqs, dtype=np.int64)
        for i, state in steered:
            prompt_slot[i] = where.get(state.prompt_key, 0)
            gen_slot[i] = where.get(state.generated_key, 0)
        total = mapping.token_slots(num_scheduled[:num_reqs], num_computed[:num_reqs], num_prompt[:num_reqs],
                                    prompt_slot, gen_slot, self._host)
        end = max(total, self._high_water)
        self._host[total:end] = 0
        self.token_slots[:end].copy_(self.uploader.to_device(self._host[:end]), non_blocking=True)
        self._high_water = total
        self.counters.steered_steps += 1
        self.counters.steered_tokens += int(np.count_nonzero(self._host[:total]))

    def point_all_at(self, slot: int, count: int) -> None:
        """Make the first ``count`` tokens read ``slot`` (the self-check's probe; no live requests)."""
        self.token_slots.zero_()
        self.token_slots[:count].fill_(slot)
        self._high_water = max(self._high_water, count)

    # ----- memory lost (sleep level 2) or inspected -------------------------------------------
    def restore(self) -> None:
        """Rewrite identity everywhere and every resident mask (after the bank's memory was lost)."""
        for op in self.ops:
            op.reset()
        self.token_slots.zero_()
        self._high_water = 0
        self.uploader.begin_step()
        for slot, mask in self.table.resident.items():
            self._write(slot, mask)
        self.uploader.synchronize()

    def status(self) -> dict[str, Any]:
        return {
            "self_check": self.self_check,
            "layers": list(self.op.layers),
            "neurons": {"offset": self.op.offset, "size": self.op.local_size},
            "slots": {"capacity": self.table.capacity, "in_use": self.table.in_use, "masks_known": self.table.known},
            "heads": ({"offset": self.head_op.offset, "size": self.head_op.local_size,
                       "head_dim": self.head_op.head_dim} if self.head_op is not None else None),
            "directions": ({"hidden": self.direction_op.local_size} if self.direction_op is not None else None),
            "bank_bytes": sum(op.nbytes for op in self.ops),
            "read_back": self.reader.status() if self.reader is not None else None,
            "stats": self.stats.summary() if self.stats is not None else None,
            "active_requests": self.active_requests,
            "counters": dict(vars(self.counters)),
        }
