"""Admission control: never more distinct masks in flight than the bank has slots.

When the mask bank is smaller than the worst case (``2 * max_num_seqs + 1`` slots, see
:func:`kn_steer.serving.engine_config.bank_slots`), ``Scheduler.schedule`` is wrapped the way vLLM
limits ``max_loras``: waiting requests whose masks would push the distinct masks of running and
admitted requests beyond ``slots - 1`` are withheld for this step (removed from the waiting queue
before vLLM schedules, put back in their order right after). Requests with masks already in use,
and unsteered requests, are never held back. Running requests and requests that hold KV blocks
are counted first, so every step needs at most ``slots - 1`` distinct masks and the workers never
run out (the worker still checks and fails loudly if it ever did).
"""

from __future__ import annotations

from typing import Any

from kn_steer.serving.wire import WIRE_KEY, mask_keys

_KEYS_ATTR = "_kn_steer_keys"
_LIMIT_ATTR = "_kn_steer_mask_limit"


def request_keys(request: Any) -> frozenset[str]:
    keys = getattr(request, _KEYS_ATTR, None)
    if keys is None:
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        keys = mask_keys(extra.get(WIRE_KEY))
        setattr(request, _KEYS_ATTR, keys)
    return keys


def _limit(scheduler: Any) -> int | None:
    """Distinct masks allowed at once (None: the bank covers the worst case, nothing to do)."""
    if not hasattr(scheduler, _LIMIT_ATTR):
        extra = getattr(scheduler.vllm_config, "additional_config", None) or {}
        mark = extra.get("kn_steer") or {}
        limit = int(mark["slots"]) - 1 if mark.get("enabled") and mark.get("admission") else None
        setattr(scheduler, _LIMIT_ATTR, limit)
    return getattr(scheduler, _LIMIT_ATTR)


def withheld(running: Any, holding: Any, waiting: Any, limit: int) -> list[Any]:
    """Waiting requests to hold back this step (in queue order)."""
    committed: set[str] = set()
    for request in (*running, *holding):
        committed |= request_keys(request)
    held = []
    for request in waiting:
        keys = request_keys(request)
        if keys <= committed:
            continue
        if len(committed | keys) <= limit:
            committed |= keys
        else:
            held.append(request)
    return held


def wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        limit = _limit(self)
        if limit is None:
            return orig(self, *args, **kwargs)
        held = withheld(self.running, self.kv_holding_waiting, self.waiting, limit)
        if not held:
            return orig(self, *args, **kwargs)
        self.waiting.remove_requests(held)
        try:
            return orig(self, *args, **kwargs)
        finally:
            self.waiting.prepend_requests(reversed(held))

    return schedule
