"""Neuron sets registered while the server runs: ``POST /v1/kn_steer/sets``, ``DELETE .../NAME``.

A set posted here is validated exactly as a file of the sets folder at start-up (the served model's
name, fingerprint and shape; neuron ranges; its default dose within the server's limits) and is
then usable by name, and as a preset of its name (a model id of its own) when the server serves
sets as presets. It lives in memory: a restart forgets it (put the file in the sets folder to keep
it).

Why removal is safe for live requests: a request's spec is compiled into masks when it is admitted
and the masks travel with the request, so a request already admitted keeps its set's neurons until
it finishes. The compile cache is keyed by the registry's generation, so a later request never
reuses masks compiled for a removed set. A set that a preset of the presets file or an A/B arm
still names cannot be removed (409).

Both routes live under ``/v1``, which vLLM's ``--api-key`` guards: with a key, they need it.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from pydantic import ValidationError

from kn_steer.errors import KnSteerError, NeuronSetMismatch, SpecError
from kn_steer.serving import hooks, preset_models
from kn_steer.serving.context import ServingContext, check_set_dose, usable_preset
from kn_steer.sets.format import NeuronSet
from kn_steer.steering.presets import presets_of_sets, set_preset_name

logger = logging.getLogger("kn_steer.serving")
MAX_SET_BYTES = 64 << 20  # a set of every neuron of a 70B model's 80 layers x 28,672 is ~40 MB of JSON
_lock = threading.Lock()


class SetRequestError(KnSteerError):
    """A refused registration or removal, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _parse(body: bytes) -> NeuronSet:
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise SetRequestError(f"the body is not a JSON neuron-set file ({exc})") from None
    try:
        return NeuronSet.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in exc.errors()[:5])
        raise SetRequestError(f"not a valid neuron-set file: {problems}") from None


def register(ctx: ServingContext, body: bytes) -> dict[str, Any]:
    """Validate and register a set; what the route answers (201)."""
    if not ctx.enabled:
        raise SetRequestError(f"steering is not available for this model: {ctx.reason}", 409)
    ns = _parse(body)
    identity = ctx.identity
    if identity is not None and ns.model.name != identity.name and ns.model.fingerprint != identity.fingerprint:
        raise SetRequestError(f"neuron set {ns.name!r} was made for model {ns.model.name!r}; this server serves "
                              f"{identity.name!r}")
    try:
        if identity is not None:
            ns.check_model(identity)
        check_set_dose(ns.name, {ns.name: ns}, ctx.shape, ctx.limits)
    except (NeuronSetMismatch, SpecError) as exc:
        raise SetRequestError(str(exc)) from None
    with _lock:
        if ns.name in ctx.registry:
            raise SetRequestError(f"a neuron set named {ns.name!r} is already registered; DELETE it first", 409)
        preset = _preset_name(ctx, ns.name)
        if ctx.settings.set_presets and preset in ctx.presets:
            raise SetRequestError(f"{preset!r} is already the name of a preset", 409)
        ctx.registry.add(ns)
        model_id = None
        if ctx.settings.set_presets:
            spec = presets_of_sets([ns.name])[ns.name]
            if usable_preset(preset, spec, ctx.registry, ctx.shape, ctx.limits):
                ctx.presets[preset] = spec
                model_id = preset_models.add(preset)
    logger.info("kn-steer: neuron set %r registered at run time (%d neurons)", ns.name, len(ns.neurons))
    described = next(d for d in ctx.registry.describe() if d["name"] == ns.name)
    return {**json.loads(json.dumps(described, default=str)), "preset_model": model_id}


def _preset_name(ctx: ServingContext, set_name: str) -> str:
    return set_preset_name(set_name, ctx.identity.name if ctx.identity is not None else None)


def _own_preset(ctx: ServingContext, set_name: str) -> str | None:
    """The preset that is the set itself (named short, or by its full name after a collision)."""
    own = [{"interventions": [{"set": set_name}]}]
    for name in (_preset_name(ctx, set_name), set_name):
        spec = ctx.presets.get(name)
        if spec is not None and [spec.model_dump(mode="json", exclude_defaults=True)] == own:
            return name
    return None


def unregister(ctx: ServingContext, name: str) -> dict[str, Any]:
    """Remove a set (and its own preset); refused while a file preset or an A/B arm names it."""
    with _lock:
        if name not in ctx.registry:
            raise SetRequestError(f"no neuron set named {name!r} is registered", 404)
        own = _own_preset(ctx, name)
        users = [f"preset {p!r}" for p, spec in ctx.presets.items()
                 if p != own and any(iv.set == name for iv in spec.interventions)]
        users += hooks.users_of_set(name) + (hooks.users_of_set(own) if own not in (None, name) else [])
        if users:
            raise SetRequestError(f"neuron set {name!r} is still named by {', '.join(users)}; it stays registered",
                                  409)
        ctx.registry.remove(name)
        if own is not None:
            del ctx.presets[own]
            preset_models.remove(own)
    logger.info("kn-steer: neuron set %r removed at run time", name)
    return {"object": "kn_steer.set.deleted", "name": name, "deleted": True}
