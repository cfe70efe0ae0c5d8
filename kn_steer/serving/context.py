"""Per-process serving context: the served model's shape and identity, its neuron sets, the limits.

Built once per process from the vLLM model config. A model kn-steer cannot steer (an unsupported
architecture, a hub id instead of a local folder) still serves: its context is *disabled*, with
the reason, and every request carrying ``kn_steer`` is answered 400 with that reason. A neuron
set that does not match the served model stops start-up (an operator error, not a request's).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kn_steer.errors import KnSteerError, UnsupportedArchitecture
from kn_steer.models.families import FamilyAdapter, ModelShape, adapter_for_config
from kn_steer.serving.settings import ServingSettings, load_settings
from kn_steer.sets.format import ModelIdentity, model_identity
from kn_steer.sets.registry import NeuronSetRegistry
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.spec import SteeringSpec

logger = logging.getLogger("kn_steer.serving")


@dataclass(frozen=True)
class ServingContext:
    """What the API edge needs to compile a spec for the served model."""

    model_path: str
    enabled: bool
    reason: str  # why steering is unavailable ("" when enabled)
    settings: ServingSettings
    limits: RequestLimits
    adapter: FamilyAdapter | None = None
    shape: ModelShape | None = None
    identity: ModelIdentity | None = None
    registry: NeuronSetRegistry = field(default_factory=lambda: NeuronSetRegistry({}, None))
    presets: dict[str, SteeringSpec] = field(default_factory=dict)

    @property
    def max_neurons(self) -> int:
        return self.limits.max_neurons


_contexts: dict[str, ServingContext] = {}
_lock = threading.Lock()


def _disabled(model_path: str, reason: str, settings: ServingSettings, limits: RequestLimits) -> ServingContext:
    logger.warning("kn-steer: steering is not available for %s: %s (the model serves normally; requests "
                   "with kn_steer get HTTP 400)", model_path, reason)
    return ServingContext(model_path, False, reason, settings, limits)


def load_context(model_path: str, hf_config: Any, dtype: Any = None) -> ServingContext:
    """Validate the model and load the neuron-set folder once per process (errors name the cause)."""
    settings = load_settings()
    limits = settings.limits(str(dtype) if dtype is not None else None)
    key = f"{model_path}|{settings.model_dump_json()}|{limits}"
    with _lock:
        if key in _contexts:
            return _contexts[key]
        from kn_steer.models.checkpoints import resolve_model

        try:
            adapter = adapter_for_config(hf_config, serving=True)
        except UnsupportedArchitecture as exc:
            ctx = _disabled(model_path, str(exc), settings, limits)
        else:
            path = Path(model_path)
            if not (path / "config.json").is_file():
                ctx = _disabled(model_path, (
                    f"kn-steer needs a local model folder to check neuron sets against; {model_path!r} is "
                    "not one (prepare it with `kn-steer model prepare` or pass a folder)"), settings, limits)
            else:
                shape = ModelShape.from_config(hf_config)
                identity = model_identity(resolve_model(path), hf_config)
                folder = settings.sets_dir
                try:
                    if folder.exists() or settings.sets_dir_explicit:
                        registry = NeuronSetRegistry.load(folder, identity)
                    else:  # installed without the project's neuron_sets/: explicit neurons only
                        registry = NeuronSetRegistry({}, None)
                    _check_set_doses(registry, shape, limits)
                    presets = _load_presets(settings, registry, shape, limits, identity.name)
                except KnSteerError as exc:
                    raise type(exc)(f"kn-steer refuses to start: {exc}") from exc
                ctx = ServingContext(str(model_path), True, "", settings, limits, adapter, shape, identity, registry,
                                     presets)
        _contexts[key] = ctx
        return ctx


def _check_set_doses(registry: NeuronSetRegistry, shape: ModelShape, limits: RequestLimits) -> None:
    """A set whose default operation is beyond the served limits could never be used: say so now."""
    for name in registry:
        check_set_dose(name, registry, shape, limits)


def check_set_dose(name: str, sets: Any, shape: ModelShape, limits: RequestLimits) -> None:
    """Compile a set's default operation: neuron ranges and doses within the served limits."""
    from dataclasses import replace

    from kn_steer.steering.compile import compile_spec

    doses_only = replace(limits, max_neurons=10**9)  # a big set can still be used on some layers
    compile_spec({"interventions": [{"set": name}]}, sets, shape, doses_only,
                 where=f"neuron set {name!r} (its default operation)")


def usable_preset(name: str, spec: SteeringSpec, registry: NeuronSetRegistry, shape: ModelShape,
                  limits: RequestLimits) -> bool:
    """Whether a set's own preset can be served: one request may use the whole set."""
    from kn_steer.errors import SpecError
    from kn_steer.steering.compile import compile_spec

    try:
        compile_spec(spec, registry, shape, limits)
    except SpecError as exc:  # e.g. a set larger than one request may touch: usable per layer only
        logger.warning("kn-steer: preset %r of a neuron set is not served: %s", name, exc)
        return False
    return True


def _load_presets(settings: ServingSettings, registry: NeuronSetRegistry, shape: ModelShape,
                  limits: RequestLimits, model_name: str) -> dict[str, SteeringSpec]:
    """The served presets: one per set that fits the limits, plus the presets file's, all compiled once.

    An experiment preset is checked against the experiments when the API server is built."""
    from kn_steer.steering.compile import compile_spec
    from kn_steer.steering.presets import load_presets_file, merge_presets, presets_of_sets

    from_sets = {}
    if settings.set_presets:
        from_sets = {name: spec for name, spec in presets_of_sets(registry, model_name).items()
                     if usable_preset(name, spec, registry, shape, limits)}
    from_file = load_presets_file(settings.presets_file) if settings.presets_file is not None else {}
    for name, spec in from_file.items():
        if spec.experiment is None:
            compile_spec(spec, registry, shape, limits, where=f"preset {name!r}")
    return merge_presets(from_sets, from_file, str(settings.presets_file or "presets"))


def current_context() -> ServingContext:
    """The context of this process's served model (the API server serves one model)."""
    if not _contexts:
        raise KnSteerError("kn-steer: no served model is set up in this process")
    return next(reversed(_contexts.values()))
