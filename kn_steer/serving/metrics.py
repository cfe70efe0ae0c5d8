"""Prometheus evidence of steering, on vLLM's ``/metrics`` (prometheus_client's default registry).

Front end (API server): finished requests by whether they were steered, their steered tokens by
position kind, and requests refused at the API edge. Engine (refreshed from every worker's
``kn_steer_status`` each time ``/metrics`` is scraped): tokens and requests the workers actually
steered, mask slots in use and available, bank bytes, whether the self-check passed, and the live
statistics of watched neurons per set and A/B arm (:mod:`.stats`). Names
avoid vLLM's ``vllm:`` prefix (vLLM unregisters its own collectors by prefix).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge

logger = logging.getLogger("kn_steer.serving")


def _existing(name: str) -> Any:
    # A second import (tests, reloads) must reuse the collectors already registered.
    return REGISTRY._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup exists


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return _existing(name) or Counter(name, doc, labels)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return _existing(name) or Gauge(name, doc, labels)


REQUESTS = _counter("kn_steer_requests", "Finished completion/chat requests, by whether kn_steer steered them",
                    ("steered",))
TOKENS = _counter("kn_steer_steered_tokens", "Tokens of finished requests whose forward pass was steered",
                  ("position",))
REJECTED = _counter("kn_steer_rejected_requests", "Requests refused at the API edge for their kn_steer field")
ENGINE_TOKENS = _gauge("kn_steer_engine_steered_tokens", "Tokens the workers steered since start (tensor rank 0)")
ENGINE_REQUESTS = _gauge("kn_steer_engine_steered_requests", "Steered requests the workers have seen since start")
SLOTS_IN_USE = _gauge("kn_steer_engine_slots_in_use", "Mask slots holding a mask (tensor rank 0)")
SLOTS = _gauge("kn_steer_engine_slot_capacity", "Mask slots per worker, the identity included")
BANK_BYTES = _gauge("kn_steer_engine_bank_bytes", "Memory of the mask banks, all workers")
SELF_CHECK = _gauge("kn_steer_engine_self_check_passed", "1 when every worker passed the start-up self-check")
WATCHED_FIRING = _gauge("kn_steer_watched_firing_rate", "Share of (token, neuron) pairs where a watched set's neuron "
                        "exceeded the threshold, since start, per A/B arm ('none': outside experiments)", ("set", "arm"))
WATCHED_MEAN = _gauge("kn_steer_watched_mean_activation", "Mean value of a watched set's neurons per token, since "
                      "start, per A/B arm", ("set", "arm"))
WATCHED_TOKENS = _gauge("kn_steer_watched_tokens", "Tokens counted in the live neuron statistics, per A/B arm", ("arm",))


def steers(info: dict[str, Any], kind: str) -> bool:
    """Whether a request's masks touch any unit (neuron, head or direction) of ``kind`` positions."""
    return bool(info["neurons"][kind] or info.get("heads", {}).get(kind) or info.get("direction_layers", {}).get(kind))


def observe_request(info: dict[str, Any] | None, *, error: bool, prompt_tokens: int | None,
                    completion_tokens: int | None) -> None:
    steered = info is not None and (steers(info, "prompt") or steers(info, "generated"))
    REQUESTS.labels("true" if steered else "false").inc()
    if not steered or error:
        return
    if steers(info, "prompt") and prompt_tokens:
        TOKENS.labels("prompt").inc(prompt_tokens)
    if steers(info, "generated") and completion_tokens:
        TOKENS.labels("generated").inc(completion_tokens)


def set_engine(statuses: list[dict[str, Any]]) -> None:
    steering = [s for s in statuses if s.get("enabled") and "slots" in s]
    SELF_CHECK.set(1.0 if steering and all((s.get("self_check") or {}).get("passed") for s in steering) else 0.0)
    if not steering:
        return
    from kn_steer.serving.stats import summarize

    watched = summarize([s.get("stats") for s in steering])
    if watched is not None:
        for arm, count in watched["tokens"].items():
            WATCHED_TOKENS.labels(arm).set(count)
        for name, entry in watched["sets"].items():
            for arm, values in entry["groups"].items():
                if values["firing_rate"] is not None:
                    WATCHED_FIRING.labels(name, arm).set(values["firing_rate"])
                    WATCHED_MEAN.labels(name, arm).set(values["mean_activation"])
    first = steering[0]
    ENGINE_TOKENS.set(first["counters"]["steered_tokens"])
    ENGINE_REQUESTS.set(first["counters"]["steered_requests"])
    SLOTS_IN_USE.set(first["slots"]["in_use"])
    SLOTS.set(first["slots"]["capacity"])
    BANK_BYTES.set(sum(s["bank_bytes"] for s in steering))


async def refresh_engine(app: Any, timeout: float = 2.0) -> None:
    """Pull every worker's status into the gauges (on each scrape; a slow engine is skipped)."""
    engine = getattr(getattr(app, "state", None), "engine_client", None)
    if engine is None:
        return
    try:
        statuses = await asyncio.wait_for(engine.collective_rpc("kn_steer_status"), timeout)
    except Exception:  # noqa: BLE001 - metrics must never break a scrape
        logger.debug("kn-steer: engine status unavailable for /metrics", exc_info=True)
        return
    set_engine(list(statuses))
