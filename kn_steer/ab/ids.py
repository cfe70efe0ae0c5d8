"""Which logged request an id names: the one id a client sees, and the others it may hold.

A served request has up to three ids: the response's ``id`` (``cmpl-<X>`` / ``chatcmpl-<X>``,
where X is the ``X-Request-Id`` header when a client or gateway sent one, else the body's
request id), the header value itself, and the body's request id (vLLM's ``request_id`` field).
The log keys a request by the id the client sees (the response ``id``) and keeps the others as
aliases, so an outcome can be attached with any of them. An id that names more than one logged
request (a reused ``X-Request-Id``, or one request's header equal to another's response id) is
refused as ambiguous rather than guessed.

Every id is client-controlled, so the log never holds more than :data:`MAX_ID_CHARS` of one: a
longer id is logged as ``sha256:<hex>`` of itself, and looked up the same way.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Iterable

from kn_steer.errors import KnSteerError

MAX_ID_CHARS = 256
RESPONSE_ID_PREFIXES = ("cmpl-", "chatcmpl-")  # vLLM's response ids: prefix + the request id
_SHOWN_CHARS = 80  # of a client string echoed in an error message


def bounded_id(value: str) -> str:
    """``value`` as the log holds it: itself when short, else a digest (no megabyte ids in the log)."""
    if len(value) <= MAX_ID_CHARS:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def clip(value: Any, limit: int = _SHOWN_CHARS) -> str:
    """``repr`` of a client value for a message, cut to ``limit`` characters with its length."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} chars" if isinstance(value, (str, bytes, list, dict)) else f"{len(text)} chars as text"
    return f"{text[:limit]}... ({size})"


def record_ids(record: dict[str, Any]) -> tuple[str, list[str]]:
    """(logged id, aliases) of a finished-request record as the serving hooks hand it over.

    The logged id is the response ``id`` when the record carries it (``response_id``), else the
    request id; the header value and the request id become aliases.
    """
    request_id = record.get("request_id")
    response_id = record.get("response_id")
    header_id = record.get("header_request_id")
    ids = [str(v) for v in (response_id, header_id, request_id) if isinstance(v, str) and v]
    if not ids:
        raise KnSteerError("the request record carries no request id")
    bounded = list(dict.fromkeys(bounded_id(v) for v in ids))
    return bounded[0], bounded[1:]


class RequestIndex:
    """Every id that names a logged request, mapped to the logged ids (and experiments) it names."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = defaultdict(set)  # any id -> logged ids it names
        self._count: dict[str, int] = defaultdict(int)  # logged id -> assignments logged under it
        self.experiment: dict[str, str] = {}  # logged id -> its experiment (the latest one)

    def __len__(self) -> int:
        return len(self._count)

    def add(self, logged: str, aliases: Iterable[str], experiment: str) -> None:
        self._count[logged] += 1
        self.experiment[logged] = experiment
        for name in (logged, *aliases):
            self._names[name].add(logged)

    def candidates(self, given: str) -> set[str]:
        """Logged ids that ``given`` names: directly, else with a response-id prefix taken off
        (logs written before the response id was logged hold the bare request id)."""
        key = bounded_id(given)
        if key in self._names:
            return set(self._names[key])
        for prefix in RESPONSE_ID_PREFIXES:
            if given.startswith(prefix) and bounded_id(given[len(prefix):]) in self._names:
                return set(self._names[bounded_id(given[len(prefix):])])
        return set()

    def lookup(self, given: str, where: str) -> str:
        """The one logged id ``given`` names; a KnSteerError for an unknown or ambiguous id."""
        found = self.candidates(given)
        if not found:
            raise KnSteerError(f"unknown request id {clip(given)}: no experiment request with that id "
                               f"was logged in {where} (use the response's `id`; a request is logged when it finishes)")
        requests = sum(self._count[f] for f in found)
        if requests > 1:
            shown = ", ".join(clip(f, 40) for f in sorted(found)[:3])
            raise KnSteerError(
                f"request id {clip(given)} is ambiguous: it names {requests} logged requests ({shown}); "
                "an X-Request-Id header was reused or equals another request's id. Send unique "
                "X-Request-Id values; outcomes of these requests cannot be attached")
        (logged,) = found
        return logged
