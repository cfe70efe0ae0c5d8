"""Extension points of the serving plugin, for the A/B-testing layer (``kn_steer.ab``).

The plugin calls these from the API-server process only (never in the engine core or workers):

* ``experiment_resolver(spec, request_id) -> (resolved_spec, info)`` is called for a request whose
  spec names an ``experiment``; ``request_id`` is the id the client will see in the response
  (``cmpl-<X-Request-Id header or body request_id>``; offline: the engine request id). It returns the spec of the drawn arm (interventions only, no
  ``experiment``) and a JSON-able ``info`` dict (e.g. ``{"experiment": ..., "arm": ...}``) that is
  merged into the response's ``kn_steer`` object and into the request record. Raise
  :class:`kn_steer.errors.SpecError` for an unknown experiment: the client gets HTTP 400.
* ``request_listeners``: each is called once per finished request (completed or failed) with a
  record dict: ``request_id`` (the body's), ``response_id`` (the id the client sees, e.g.
  ``cmpl-...``; None when the request failed before a response), ``header_request_id`` (the
  ``X-Request-Id`` header, or None), ``endpoint`` ("completions"/"chat"), ``kn_steer`` (the applied
  info incl. ``experiment``/``arm`` when present, or None), ``prompt_tokens``,
  ``completion_tokens``, ``latency_s``, ``error`` (bool), ``status`` (HTTP status int),
  ``prompt`` (the request's prompt, or its chat messages; the A/B log keeps it only on opt-in).
  Listeners must be quick and must not raise (exceptions are logged and swallowed).
* ``route_installers``: each is called with the FastAPI app when the API server builds it; add
  routes there (``app.get(...)``/``app.include_router``).
* ``set_users``: each is called with a neuron-set name before the set is removed at run time
  (``DELETE /v1/kn_steer/sets/NAME``) and returns what still needs it (e.g. ``["experiment 'x'
  arm 'y'"]``); anything listed keeps the set registered (HTTP 409).

Extensions are found through the entry-point group ``kn_steer.serving_extensions`` (the A/B layer
is ``kn_steer.ab:install``) and called once in the API-server process, before the app is built,
so they can register themselves here; serving never imports them by name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from kn_steer.steering.spec import SteeringSpec

logger = logging.getLogger("kn_steer.serving")

ExperimentResolver = Callable[["SteeringSpec", str], "tuple[SteeringSpec, dict[str, Any]]"]
RequestListener = Callable[[dict[str, Any]], None]
RouteInstaller = Callable[["FastAPI"], None]
SetUsers = Callable[[str], list[str]]

experiment_resolver: ExperimentResolver | None = None
request_listeners: list[RequestListener] = []
route_installers: list[RouteInstaller] = []
set_users: list[SetUsers] = []


def set_experiment_resolver(resolver: ExperimentResolver | None) -> None:
    """Install (or clear with None) the experiment resolver."""
    global experiment_resolver
    experiment_resolver = resolver


def add_request_listener(listener: RequestListener) -> None:
    if listener not in request_listeners:
        request_listeners.append(listener)


def add_route_installer(installer: RouteInstaller) -> None:
    if installer not in route_installers:
        route_installers.append(installer)


def add_set_users(finder: SetUsers) -> None:
    if finder not in set_users:
        set_users.append(finder)


def users_of_set(name: str) -> list[str]:
    """Everything an extension says still uses the set ``name``."""
    return [user for finder in list(set_users) for user in finder(name)]


def notify_request(record: dict[str, Any]) -> None:
    """Hand a finished-request record to every listener; a failing listener never breaks serving."""
    for listener in list(request_listeners):
        try:
            listener(record)
        except Exception:  # noqa: BLE001 - listeners are third-party code
            logger.exception("kn-steer request listener %r failed", listener)


def install_routes(app: "FastAPI") -> None:
    for installer in list(route_installers):
        installer(app)
