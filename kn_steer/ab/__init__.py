"""A/B testing of interventions on live traffic.

The serving plugin calls :func:`install` once in the API-server process. It reads the experiments
file named by ``$KN_STEER_EXPERIMENTS`` (absent: A/B disabled, and a request naming an experiment
is a 400), validates every arm against the served neuron-set registry (a bad file refuses to start)
and registers itself in :mod:`kn_steer.serving.hooks`:

* the experiment resolver (request ``{"kn_steer": {"experiment": NAME, "unit": ID}}`` -> arm);
* a request listener (per-arm Prometheus metrics and the JSONL assignment log, ``$KN_STEER_AB_LOG``;
  other replicas' logs in ``$KN_STEER_AB_PEER_LOGS`` are read so an outcome may be posted to any replica);
* routes ``GET /v1/kn_steer/experiments`` and ``POST /v1/kn_steer/outcomes``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from kn_steer.ab.config import ExperimentsConfig, load_config, validate_specs
from kn_steer.ab.log import default_log_path, peer_log_paths
from kn_steer.ab.service import ABService
from kn_steer.errors import KnSteerError

CONFIG_ENV = "KN_STEER_EXPERIMENTS"
logger = logging.getLogger("kn_steer.ab")

_lock = threading.Lock()
_service: ABService | None = None


def _serving_context() -> Any | None:
    """The serving plugin's context (registry, shape, limits) if this process has one."""
    try:
        from kn_steer.serving.context import current_context
    except ImportError:
        return None
    try:
        return current_context()
    except KnSteerError:
        return None


def _validate(config: ExperimentsConfig, source: str, context: Any | None) -> bool:
    """Validate arms against the served registry; True when the model shape was known too.

    Without a serving context yet, set names are checked against the neuron-set folder the
    plugin will load; the full check (neuron ranges, limits) runs again when the app is built.
    """
    if context is not None:
        validate_specs(config, context.registry, context.shape, getattr(context, "limits", None), source,
                       presets=getattr(context, "presets", None))
        return True
    from kn_steer.sets.registry import NeuronSetRegistry, default_sets_dir

    sets = NeuronSetRegistry.load(None) if default_sets_dir().exists() else {}
    validate_specs(config, sets, None, source=source)
    return False


def install(config_path: str | os.PathLike | None = None, *, context: Any | None = None,
            log_path: str | os.PathLike | None = None, force: bool = False) -> ABService:
    """Load and validate the experiments config and register the A/B hooks (idempotent).

    Raises :class:`KnSteerError` for a bad config: the server must not start with it.
    """
    global _service
    from kn_steer.serving import hooks

    with _lock:
        if _service is not None and not force:
            return _service
        raw_path = config_path if config_path is not None else os.environ.get(CONFIG_ENV) or None
        config = None
        fully_checked = True
        if raw_path is not None:
            path = Path(raw_path).expanduser()
            config = load_config(path)
            fully_checked = _validate(config, str(path), context or _serving_context())
        service = ABService(config, log_path if log_path is not None else default_log_path(),
                            config_path=str(raw_path) if raw_path is not None else None,
                            peer_logs=peer_log_paths())

        def install_routes(app: Any) -> None:
            nonlocal fully_checked
            if config is not None and not fully_checked:
                ctx = _serving_context()
                if ctx is not None:
                    fully_checked = _validate(config, str(raw_path), ctx)
            service.install_routes(app)

        service.route_installer = install_routes  # type: ignore[attr-defined]
        if _service is not None:  # replaced only once the new config has passed validation
            _unregister(_service)
        hooks.set_experiment_resolver(service.resolve)
        if config is not None:  # without experiments there is nothing to record: no per-request cost
            hooks.add_request_listener(service.on_request)
        hooks.add_route_installer(install_routes)
        hooks.add_set_users(service.arms_using)
        _service = service
        if config is not None:
            logger.info("kn-steer A/B: %d experiment(s) from %s, log %s",
                        len(config.experiments), raw_path, service.log.path)
        return service


def _unregister(service: ABService) -> None:
    from kn_steer.serving import hooks

    if hooks.experiment_resolver == service.resolve:
        hooks.set_experiment_resolver(None)
    if service.on_request in hooks.request_listeners:
        hooks.request_listeners.remove(service.on_request)
    if service.arms_using in hooks.set_users:
        hooks.set_users.remove(service.arms_using)
    installer = getattr(service, "route_installer", None)
    if installer in hooks.route_installers:
        hooks.route_installers.remove(installer)


def uninstall() -> None:
    """Remove the A/B hooks (tests, or a plugin shutting the layer off)."""
    global _service
    with _lock:
        if _service is not None:
            _unregister(_service)
            _service = None


def current_service() -> ABService | None:
    return _service


__all__ = ["install", "uninstall", "current_service", "ABService", "CONFIG_ENV"]
