"""Arm assignment: a unit always lands in the same arm; without a unit the arm is drawn at random.

The draw maps ``sha256(experiment NUL unit)`` to a number in [0, 1) and picks the first arm whose
cumulative normalized weight exceeds it. sha256 (not Python's ``hash``) makes the mapping the same
in every process, interpreter and hash seed, so several API servers agree.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from itertools import accumulate
from typing import Sequence

_SCALE = float(1 << 64)
_rng = random.SystemRandom()


def unit_point(experiment: str, unit: str) -> float:
    """A uniform number in [0, 1) fixed by (experiment, unit)."""
    digest = hashlib.sha256(experiment.encode("utf-8") + b"\x00" + unit.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def pick(weights: Sequence[float], point: float) -> int:
    """Index of the arm that owns ``point`` in [0, 1) under the normalized cumulative weights."""
    total = float(sum(weights))
    bounds = [c / total for c in accumulate(weights)]
    return min(bisect_right(bounds, point), len(weights) - 1)


def assign(experiment: str, weights: Sequence[float], unit: str | None) -> tuple[int, str]:
    """(arm index, how): ``"hash"`` for a unit, ``"random"`` without one."""
    if unit is None:
        return pick(weights, _rng.random()), "random"
    return pick(weights, unit_point(experiment, unit)), "hash"
