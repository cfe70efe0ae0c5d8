"""Per-layer mask slots and the per-token slot index, the way vLLM maps LoRA adapters to tokens.

Every layer's output projection gets ``h <- h * mul[slot] + add[slot]`` where ``slot`` comes from
``token_slots`` (one entry per scheduled token). The tensors are allocated once at model load and
only ever updated in place, so a compiled graph traced once (with no request active) keeps
reading the current masks: the math always runs, specs never trigger recompilation, and an
unsteered token simply reads slot 0 (the identity).

Slot policy: a slot holds one distinct :class:`~kn_steer.spec.SparseMask` (keyed by
``SparseMask.key()``, so requests with the same spec share it). A step needs at most two masks per
scheduled request, so ``2 * max_num_seqs + 1`` slots (the default) can never run out. Masks of
live requests that are not scheduled in a step (preempted ones) may be evicted (LRU) and are
written back when their request runs again. A mask leaves the bank when its last request ends.

Tensor parallelism: each rank keeps only its slice ``[offset, offset + local)`` of the
intermediate dimension and drops neurons outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from kn_steer.errors import KnSteerError
from kn_steer.steering.masks import CompiledSteering, SparseMask


@dataclass
class _Entry:
    mask: SparseMask
    refs: int = 0
    slot: int = 0  # 0: not resident
    last_used: int = 0


@dataclass
class _Request:
    prompt_key: str | None  # None: identity
    generated_key: str | None


class MaskBank:
    """Slots of per-layer (mul, add) rows plus the token -> slot index of the current step."""

    def __init__(
        self,
        num_layers: int,
        local_size: int,
        offset: int,
        num_slots: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_slots < 2:
            raise KnSteerError("the mask bank needs at least 2 slots (slot 0 is the identity)")
        self.num_layers, self.local_size, self.offset = num_layers, local_size, offset
        self.num_slots = num_slots
        # [layers, slots, local intermediate]; slot 0 stays the identity forever.
        self.mul = torch.ones(num_layers, num_slots, local_size, dtype=dtype, device=device)
        self.add = torch.zeros(num_layers, num_slots, local_size, dtype=dtype, device=device)
        self.token_slots = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self._slots_np = np.zeros(max_tokens, dtype=np.int64)
        self._high_water = 0  # token_slots[high_water:] is all zero
        self._entries: dict[str, _Entry] = {}
        self._requests: dict[str, _Request] = {}
        self._seen: set[str] = set()  # request ids looked at (steered or not)
        self._slot_owner: list[str | None] = [None] * num_slots
        self._free: list[int] = list(range(num_slots - 1, 0, -1))
        self._step = 0

    # ----- per-layer math -------------------------------------------------------------------
    def apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x * mul[slot] + add[slot]`` per token; traced into the compiled graph as is."""
        idx = self.token_slots[: x.shape[0]]
        return x * self.mul[layer].index_select(0, idx) + self.add[layer].index_select(0, idx)

    # ----- requests -------------------------------------------------------------------------
    @property
    def active_requests(self) -> int:
        return len(self._requests)

    def seen(self, req_id: str) -> bool:
        return req_id in self._seen

    def add_request(self, req_id: str, compiled: CompiledSteering | None) -> None:
        """Remember a request's masks (None or identity: the request reads slot 0)."""
        self._seen.add(req_id)
        if compiled is None or compiled.is_identity:
            return
        keys = []
        for mask in (compiled.prompt, compiled.generated):
            if mask.size == 0:
                keys.append(None)
                continue
            key = mask.key()
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(mask)
            entry.refs += 1
            keys.append(key)
        self._requests[req_id] = _Request(keys[0], keys[1])

    def remove_request(self, req_id: str) -> None:
        self._seen.discard(req_id)
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        for key in (state.prompt_key, state.generated_key):
            if key is None:
                continue
            entry = self._entries[key]
            entry.refs -= 1
            if entry.refs == 0:
                if entry.slot:
                    self._evict(key)
                del self._entries[key]

    # ----- slots ----------------------------------------------------------------------------
    def _write(self, slot: int, mask: SparseMask, identity: bool) -> None:
        local = (mask.indices >= self.offset) & (mask.indices < self.offset + self.local_size)
        if not local.any():
            return
        device = self.mul.device
        layers = torch.as_tensor(mask.layers[local], dtype=torch.long, device=device)
        idx = torch.as_tensor(mask.indices[local] - self.offset, dtype=torch.long, device=device)
        if identity:
            self.mul[layers, slot, idx] = 1.0
            self.add[layers, slot, idx] = 0.0
        else:
            self.mul[layers, slot, idx] = torch.as_tensor(mask.mul[local], device=device).to(self.mul.dtype)
            self.add[layers, slot, idx] = torch.as_tensor(mask.add[local], device=device).to(self.add.dtype)

    def _evict(self, key: str) -> None:
        entry = self._entries[key]
        self._write(entry.slot, entry.mask, identity=True)
        self._slot_owner[entry.slot] = None
        self._free.append(entry.slot)
        entry.slot = 0

    def _slot_for(self, key: str | None, needed: set[str]) -> int:
        if key is None:
            return 0
        entry = self._entries[key]
        entry.last_used = self._step
        if entry.slot:
            return entry.slot
        if not self._free:
            victims = [k for k in self._slot_owner[1:] if k is not None and k not in needed]
            if not victims:  # cannot happen with num_slots >= 2 * max_num_seqs + 1
                raise KnSteerError(f"kn-steer: all {self.num_slots - 1} mask slots are in use in one step")
            self._evict(min(victims, key=lambda k: self._entries[k].last_used))
        slot = self._free.pop()
        self._write(slot, entry.mask, identity=False)
        self._slot_owner[slot] = key
        entry.slot = slot
        return slot

    # ----- per step -------------------------------------------------------------------------
    def update_step(
        self,
        req_ids: Sequence[str],
        num_scheduled: np.ndarray,
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
    ) -> None:
        """Point every scheduled token at its request's prompt or generated slot.

        Tokens are laid out request after request in ``req_ids`` order (vLLM's flattened batch);
        a token at position ``p`` is a prompt token when ``p < num_prompt``.
        """
        self._step += 1
        num_reqs = len(req_ids)
        steered = [(i, self._requests[r]) for i, r in enumerate(req_ids) if r in self._requests]
        total = int(num_scheduled[:num_reqs].sum())
        if total > self.token_slots.shape[0]:
            raise KnSteerError(f"kn-steer: {total} tokens in one step, more than {self.token_slots.shape[0]}")
        if not steered:
            if self._high_water:
                self.token_slots[: self._high_water].zero_()
                self._high_water = 0
            return
        needed = {k for _, s in steered for k in (s.prompt_key, s.generated_key) if k is not None}
        prompt_slot = np.zeros(num_reqs, dtype=np.int64)
        gen_slot = np.zeros(num_reqs, dtype=np.int64)
        for i, state in steered:
            prompt_slot[i] = self._slot_for(state.prompt_key, needed)
            gen_slot[i] = self._slot_for(state.generated_key, needed)
        counts = num_scheduled[:num_reqs].astype(np.int64)
        req_idx = np.repeat(np.arange(num_reqs), counts)
        starts = np.cumsum(counts) - counts
        pos = num_computed[:num_reqs].astype(np.int64)[req_idx] + (np.arange(total) - starts[req_idx])
        is_prompt = pos < num_prompt[:num_reqs].astype(np.int64)[req_idx]
        out = self._slots_np[: max(total, self._high_water)]
        np.copyto(out[:total], np.where(is_prompt, prompt_slot[req_idx], gen_slot[req_idx]))
        out[total:] = 0
        self.token_slots[: out.shape[0]].copy_(torch.from_numpy(out))
        self._high_water = total


def local_slice(module: nn.Module, full_size: int) -> tuple[int, int]:
    """(offset, size) of this TP rank's share of the neuron dimension for a down projection."""
    size = int(getattr(module, "input_size_per_partition", full_size))
    rank = int(getattr(module, "tp_rank", 0) or 0)
    if size * int(getattr(module, "tp_size", 1) or 1) != full_size and size != full_size:
        raise KnSteerError(
            f"kn-steer: cannot slice {full_size} neurons into shards of {size} for tensor parallelism"
        )
    return (rank * size if size != full_size else 0), size
