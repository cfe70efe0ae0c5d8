"""Presets served as models: ``<served model>+<preset>`` in ``/v1/models``, steered by name alone.

The way vLLM serves a LoRA adapter as a model name, for tools that cannot add the ``kn_steer``
field (lm-evaluation-harness, LangChain, chat UIs). At app start-up (``init_app_state``) each preset
of the serving context gets a model id, added to vLLM's served base-model names so that vLLM's own
model check accepts it; the API edge (:func:`kn_steer.serving.edge.requested_spec`) reads the
preset from the id. Responses name the preset's model id, streamed chunks too.

A preset's model id runs the base model steered, so it is accepted only where kn-steer steers
(completions and chat) and for tokenization; :mod:`.endpoints` answers 400 for it anywhere else
rather than serving the base model unsteered under the preset's name.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncGenerator

from kn_steer.errors import KnSteerError

logger = logging.getLogger("kn_steer.serving")
SEPARATOR = "+"

_model_ids: dict[str, str] = {}  # model id -> preset name (this API-server process)
_base_name: list[str] = []
_models: list[Any] = []  # vLLM's OpenAIServingModels of this process, for presets added at run time


def preset_of_model(model: str | None) -> str | None:
    """The preset a request's model id names, or None (the base model, a LoRA, anything else)."""
    if not model or not _model_ids:
        return None
    return _model_ids.get(model)


def model_ids() -> dict[str, str]:
    """Served preset model ids -> preset names."""
    return dict(_model_ids)


def register(state: Any, presets: dict[str, Any]) -> dict[str, str]:
    """Add each preset's model id to the app's served models; check experiment presets exist."""
    from vllm.entrypoints.openai.models.protocol import BaseModelPath

    from kn_steer.serving import hooks
    from kn_steer.steering.spec import SteeringSpec

    models = state.openai_serving_models
    base = models.base_model_paths[0]
    for name, spec in presets.items():
        if spec.experiment is None:
            continue
        if hooks.experiment_resolver is None:
            raise KnSteerError(f"kn-steer refuses to start: preset {name!r} is the A/B experiment "
                               f"{spec.experiment!r}, but no experiments are configured (--experiments)")
        try:  # drawing an arm has no side effect: records are written when requests finish
            hooks.experiment_resolver(SteeringSpec(experiment=spec.experiment, unit="kn-steer-start-up"), "start-up")
        except KnSteerError as exc:
            raise KnSteerError(f"kn-steer refuses to start: preset {name!r}: {exc}") from exc
    served = {p.name for p in models.base_model_paths}
    ids = {f"{base.name}{SEPARATOR}{name}": name for name in presets}
    clash = sorted(served & set(ids))
    if clash:
        raise KnSteerError(f"kn-steer refuses to start: preset model id(s) {clash} are already served model names")
    for model_id in ids:  # the same list object backs vLLM's model registry: its model check accepts them
        models.base_model_paths.append(BaseModelPath(name=model_id, model_path=base.model_path))
    _model_ids.clear()
    _model_ids.update(ids)
    _base_name[:] = [base.name]
    _models[:] = [models]
    if ids:
        logger.info("kn-steer: %d preset(s) served as models: %s", len(ids), ", ".join(sorted(ids)))
    return ids


def add(preset: str) -> str | None:
    """Serve a preset added at run time (a set registered by POST) as a model id; None without an app."""
    if not _models:
        return None
    from vllm.entrypoints.openai.models.protocol import BaseModelPath

    base = _models[0].base_model_paths[0]
    model_id = f"{base.name}{SEPARATOR}{preset}"
    _models[0].base_model_paths.append(BaseModelPath(name=model_id, model_path=base.model_path))
    _model_ids[model_id] = preset
    return model_id


def remove(preset: str) -> None:
    """Stop serving a preset's model id (its set was removed at run time)."""
    for model_id in [m for m, p in _model_ids.items() if p == preset]:
        del _model_ids[model_id]
        if _models:
            paths = _models[0].base_model_paths
            paths[:] = [p for p in paths if p.name != model_id]  # in place: vLLM's registry shares the list


def wrap_show_available_models(orig):
    async def show_available_models(self, *args, **kwargs):
        listing = await orig(self, *args, **kwargs)
        for card in getattr(listing, "data", []):
            if card.id in _model_ids and _base_name:
                card.parent = _base_name[0]
        return listing

    return show_available_models


def name_response(response: Any, request: Any) -> None:
    """A non-streamed response to a preset's model id names that id (vLLM names the base model)."""
    model = getattr(request, "model", None)
    if preset_of_model(model) is not None and hasattr(response, "model"):
        response.model = model


def name_stream(gen: AsyncGenerator[str, None], request: Any) -> AsyncGenerator[str, None]:
    """Every streamed chunk to a preset's model id names that id."""
    model = getattr(request, "model", None)
    if preset_of_model(model) is None or not _base_name:
        return gen
    served = f'"model":{json.dumps(_base_name[0])}'
    wanted = f'"model":{json.dumps(model)}'

    async def renamed() -> AsyncGenerator[str, None]:
        async for chunk in gen:
            yield chunk.replace(served, wanted, 1) if chunk.startswith("data: {") else chunk

    return renamed()
