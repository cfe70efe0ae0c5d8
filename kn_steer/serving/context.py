"""Per-process serving state: settings from the environment and the registry of the served model.

Settings travel as environment variables (inherited by vLLM's engine and worker processes), which
``kn-steer serve`` sets from its flags:

* ``KN_STEER_NEURON_SETS`` - neuron-set folder (default: the project's ``neuron_sets/``);
* ``KN_STEER_MAX_NEURONS`` - most neurons one request may touch (default 200000);
* ``KN_STEER_SLOTS`` - mask slots per layer in the worker (default ``2 * max_num_seqs + 1``);
* ``KN_STEER_DISABLE=1`` - leave vLLM untouched (the plugin does nothing).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kn_steer.errors import KnSteerError
from kn_steer.models.families import FamilyAdapter, ModelShape, adapter_for_config
from kn_steer.sets.format import ModelIdentity, model_identity
from kn_steer.sets.registry import NeuronSetRegistry, default_sets_dir
from kn_steer.steering.spec import DEFAULT_MAX_NEURONS

ENV_MAX_NEURONS = "KN_STEER_MAX_NEURONS"
ENV_SLOTS = "KN_STEER_SLOTS"
ENV_DISABLE = "KN_STEER_DISABLE"


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes"}


def _env_int(name: str, default: int | None, minimum: int) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KnSteerError(f"${name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise KnSteerError(f"${name} must be >= {minimum}, got {value}")
    return value


def max_neurons() -> int:
    return _env_int(ENV_MAX_NEURONS, DEFAULT_MAX_NEURONS, 1)  # type: ignore[return-value]


def num_slots(max_num_seqs: int) -> int:
    """Slots per layer. The default covers the worst case (every request in a full batch with two
    distinct masks) so a step can never run out; a smaller ``$KN_STEER_SLOTS`` is raised to it."""
    needed = 2 * max_num_seqs + 1
    asked = _env_int(ENV_SLOTS, None, 2)
    return needed if asked is None else max(asked, needed)


@dataclass(frozen=True)
class ServingContext:
    """What the API edge needs to compile a spec for the served model."""

    model_path: str
    adapter: FamilyAdapter
    shape: ModelShape
    identity: ModelIdentity
    registry: NeuronSetRegistry
    max_neurons: int


_contexts: dict[str, ServingContext] = {}
_lock = threading.Lock()


def load_context(model_path: str, hf_config: Any) -> ServingContext:
    """Validate the model and load the neuron-set folder once per process (errors name the cause)."""
    key = f"{model_path}|{default_sets_dir()}|{max_neurons()}"
    with _lock:
        if key in _contexts:
            return _contexts[key]
        from kn_steer.models import resolve_model

        adapter = adapter_for_config(hf_config, serving=True)
        shape = ModelShape.from_config(hf_config)
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise KnSteerError(
                f"kn-steer needs a local model folder to check neuron sets against; {model_path!r} "
                f"is not one (prepare it with `kn-steer model prepare` or pass a folder)"
            )
        ref = resolve_model(path)
        identity = model_identity(ref, hf_config)
        folder = default_sets_dir()
        try:
            if folder.exists() or os.environ.get("KN_STEER_NEURON_SETS"):
                registry = NeuronSetRegistry.load(folder, identity)
            else:  # installed without the project's neuron_sets/: explicit neurons only
                registry = NeuronSetRegistry({}, None)
        except KnSteerError as exc:
            raise type(exc)(f"kn-steer refuses to start: {exc}") from exc
        ctx = ServingContext(str(model_path), adapter, shape, identity, registry, max_neurons())
        _contexts[key] = ctx
        return ctx


def current_context() -> ServingContext:
    """The context of this process's served model (the API server serves one model)."""
    if not _contexts:
        raise KnSteerError("kn-steer: no served model is set up in this process")
    return next(reversed(_contexts.values()))


