"""Slot bookkeeping and the token -> slot map, against the rules written out."""

from __future__ import annotations

import numpy as np
import pytest

from kn_steer.errors import KnSteerError
from kn_steer.serving.mapping import token_slots
from kn_steer.serving.slots import SlotTable


def test_shared_masks_share_a_slot_and_the_last_release_clears_it():
    table: SlotTable[str] = SlotTable(4)
    table.acquire("a", "mask-a")
    table.acquire("a", "mask-a")
    where, changes = table.place(["a"])
    assert [(c.slot, c.mask, c.clear) for c in changes] == [(where["a"], "mask-a", False)]
    assert table.release("a") == []
    (change,) = table.release("a")
    assert change.clear and change.slot == where["a"] and table.in_use == 0 and table.known == 0


def test_lru_eviction_spares_the_masks_of_the_step():
    table: SlotTable[str] = SlotTable(3)  # two usable slots
    for key in "abc":
        table.acquire(key, key.upper())
    table.place(["a", "b"])
    where, changes = table.place(["b", "c"])
    assert {c.mask for c in changes if c.clear} == {"A"} and where["b"] != where["c"]
    with pytest.raises(KnSteerError, match="needs 3 distinct masks"):
        table.place(["a", "b", "c"])


def test_token_slots_follow_positions_in_batch_order():
    out = np.full(16, -1, dtype=np.int64)
    total = token_slots(np.array([2, 3, 1]), np.array([0, 4, 9]), np.array([5, 6, 3]),
                        np.array([1, 3, 0]), np.array([2, 4, 0]), out)
    # request 0: positions 0,1 (prompt); request 1: 4,5 prompt then 6 generated; request 2: unsteered
    assert total == 6 and out[:6].tolist() == [1, 1, 3, 3, 4, 0]
    with pytest.raises(ValueError, match="more than"):
        token_slots(np.array([20]), np.array([0]), np.array([1]), np.array([1]), np.array([1]), out)
