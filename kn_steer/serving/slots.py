"""Slot storage policy: which distinct mask lives in which slot of the bank.

Pure bookkeeping (no tensors), like vLLM LoRA's slot manager kept apart from the layer math.
Slot 0 is the identity forever; slots ``1..capacity-1`` hold masks keyed by their content hash,
so requests with the same mask share a slot. A mask stays known while a live request refers to
it (reference count). A step may need at most ``capacity - 1`` distinct masks (the scheduler's
admission control guarantees it when the bank is smaller than the worst case, see
:mod:`kn_steer.serving.admission`); masks not needed by the step may be evicted, least recently
used first, and are written back when their request runs again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from kn_steer.errors import KnSteerError

M = TypeVar("M")


@dataclass
class _Entry(Generic[M]):
    mask: M
    refs: int = 0
    slot: int = 0  # 0: not resident
    last_used: int = 0


@dataclass(frozen=True)
class SlotChange(Generic[M]):
    """A slot whose contents must change: write ``mask`` there, or restore identity (``clear``)."""

    slot: int
    mask: M
    clear: bool


class SlotTable(Generic[M]):
    """Distinct masks -> slots, with reference counts and LRU eviction."""

    def __init__(self, capacity: int):
        if capacity < 3:
            raise KnSteerError(f"the mask bank needs at least 3 slots (slot 0 is the identity), got {capacity}")
        self.capacity = capacity
        self._entries: dict[str, _Entry[M]] = {}
        self._owner: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, 0, -1))
        self._step = 0

    # ----- live requests ----------------------------------------------------------------------
    def acquire(self, key: str, mask: M) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(mask)
        entry.refs += 1

    def release(self, key: str) -> list[SlotChange[M]]:
        """Drop one reference; the last one frees the slot (returned: restore it to identity)."""
        entry = self._entries[key]
        entry.refs -= 1
        if entry.refs > 0:
            return []
        del self._entries[key]
        if not entry.slot:
            return []
        change = self._vacate(key, entry)
        return [change]

    def _vacate(self, key: str, entry: _Entry[M]) -> SlotChange[M]:
        slot = entry.slot
        self._owner[slot] = None
        self._free.append(slot)
        entry.slot = 0
        return SlotChange(slot, entry.mask, clear=True)

    # ----- per step ---------------------------------------------------------------------------
    def place(self, keys: Iterable[str]) -> tuple[dict[str, int], list[SlotChange[M]]]:
        """Make every mask of this step resident: (key -> slot, slot changes to apply first)."""
        self._step += 1
        needed = set(keys)
        if len(needed) > self.capacity - 1:
            raise KnSteerError(
                f"kn-steer: one step needs {len(needed)} distinct masks but the bank has "
                f"{self.capacity - 1} slots (admission control should have prevented this)"
            )
        changes: list[SlotChange[M]] = []
        where: dict[str, int] = {}
        for key in needed:
            entry = self._entries[key]
            entry.last_used = self._step
            if entry.slot:
                where[key] = entry.slot
                continue
            if not self._free:
                victims = [k for k in self._owner[1:] if k is not None and k not in needed]
                victim = min(victims, key=lambda k: self._entries[k].last_used)
                changes.append(self._vacate(victim, self._entries[victim]))
            slot = self._free.pop()
            self._owner[slot] = key
            entry.slot = slot
            changes.append(SlotChange(slot, entry.mask, clear=False))
            where[key] = slot
        return where, changes

    # ----- inspection -------------------------------------------------------------------------
    @property
    def resident(self) -> dict[int, M]:
        """slot -> mask of every resident mask (to rebuild the bank after its memory was lost)."""
        return {e.slot: e.mask for e in self._entries.values() if e.slot}

    @property
    def in_use(self) -> int:
        return sum(1 for owner in self._owner[1:] if owner is not None)

    @property
    def known(self) -> int:
        return len(self._entries)
