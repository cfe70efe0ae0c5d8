"""Presets: named steering specs a server keeps, so a client can steer by a name alone.

A preset is a spec of interventions, or the name of an A/B experiment. A server serves each one as
a model of its own (``<served model>+<preset>`` in ``/v1/models``), for tools that cannot add the
``kn_steer`` field, and a spec may name one (``{"preset": "faithful"}``, also in an A/B arm).

The presets file (``kn-steer serve --presets FILE``, ``$KN_STEER_PRESETS``)::

    {"presets": {
        "faithful": {"interventions": [{"set": "context-memotrap", "factor": 4}]},
        "memo-ab":  {"experiment": "memotrap-rollout"}}}

By default every neuron set the server loads is a preset too (its default operation), named
after the set without the served model's prefix (:func:`set_preset_name`); a file's preset may
not reuse such a name.

Composition (:func:`expand`), when a request names a preset and gives a spec of its own:

* a preset of interventions: the preset's interventions come first, then the request's; the usual
  rules follow (scales multiply, a clamp wins over scales, of clamps the last listed wins, so the
  request's clamp wins over the preset's);
* a preset that is an experiment: the request may add only its ``unit``; interventions beside an
  experiment are refused, as in a plain spec;
* a spec names at most one preset, and a preset never names another preset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from kn_steer.errors import KnSteerError, SpecError
from kn_steer.steering.spec import SteeringSpec, field_path

PRESET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
PresetName = Annotated[str, StringConstraints(pattern=PRESET_NAME, max_length=120)]


class PresetsFile(BaseModel):
    """The presets file: names to specs (interventions, or an experiment; never another preset)."""

    model_config = ConfigDict(extra="forbid")

    presets: dict[PresetName, SteeringSpec] = Field(default_factory=dict)

    @field_validator("presets")
    @classmethod
    def _flat(cls, presets: dict[str, SteeringSpec]) -> dict[str, SteeringSpec]:
        for name, spec in presets.items():
            if spec.preset is not None:
                raise ValueError(f"preset {name!r} names another preset ({spec.preset!r}): presets do not nest")
            if spec.unit is not None:
                raise ValueError(f"preset {name!r} gives a 'unit': units belong to requests, not presets")
            if spec.experiment is None and not spec.interventions:
                raise ValueError(f"preset {name!r} has neither interventions nor an experiment")
        return presets


def load_presets_file(path: str | Path) -> dict[str, SteeringSpec]:
    """Read and validate a presets file; errors name the file and the field."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise KnSteerError(f"presets file {path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise KnSteerError(f"presets file {path}: not valid JSON ({exc})") from None
    try:
        return dict(PresetsFile.model_validate(raw).presets)
    except ValidationError as exc:
        problems = "; ".join(f"{field_path('', err['loc']).lstrip('.')}: {err['msg']}" for err in exc.errors()[:5])
        raise KnSteerError(f"presets file {path}: {problems}") from None


def set_preset_name(set_name: str, model_name: str | None = None) -> str:
    """The preset of a set: its name without the served model's prefix (sets of a folder that holds
    several models' sets are named ``<model>-...``): ``smollm2-135m-context-memotrap`` is served as
    ``smollm2-135m+context-memotrap``, not ``smollm2-135m+smollm2-135m-context-memotrap``."""
    prefix = f"{model_name}-" if model_name else None
    if prefix and set_name.startswith(prefix) and len(set_name) > len(prefix):
        return set_name[len(prefix):]
    return set_name


def presets_of_sets(set_names: list[str] | Mapping[str, Any], model_name: str | None = None) -> dict[str, SteeringSpec]:
    """One preset per neuron set (:func:`set_preset_name`): the set with its default operation.

    Two sets whose short names collide keep their full names."""
    names = list(set_names)
    short = {name: set_preset_name(name, model_name) for name in names}
    taken = list(short.values())
    presets = {}
    for name in names:
        unique = taken.count(short[name]) == 1 and (short[name] == name or short[name] not in names)
        presets[short[name] if unique else name] = SteeringSpec.model_validate({"interventions": [{"set": name}]})
    return presets


def merge_presets(from_sets: dict[str, SteeringSpec], from_file: dict[str, SteeringSpec],
                  source: str = "presets file") -> dict[str, SteeringSpec]:
    """The served presets; a file's preset named like a set's preset is an operator error."""
    clash = sorted(set(from_sets) & set(from_file))
    if clash:
        raise KnSteerError(f"{source}: preset name(s) {clash} are also neuron sets' presets; rename them "
                           "(or serve without the sets' presets: --no-set-presets)")
    return {**from_sets, **from_file}


def with_preset(spec: SteeringSpec | None, preset: str, where: str = "kn_steer") -> SteeringSpec:
    """``spec`` (or an empty one) naming ``preset``: how a request to a preset's model id is read."""
    if spec is None:
        return SteeringSpec(preset=preset)
    if spec.preset is not None and spec.preset != preset:
        raise SpecError(f"{where}.preset: the model names preset {preset!r} and the spec names {spec.preset!r}; "
                        "give one")
    if spec.experiment is not None:
        raise SpecError(f"{where}.experiment: the model names preset {preset!r}; a request to a preset's model "
                        "cannot name an experiment as well")
    return spec.model_copy(update={"preset": preset})


def expand(spec: SteeringSpec, presets: Mapping[str, SteeringSpec], where: str = "kn_steer") -> SteeringSpec:
    """The spec with its preset replaced by the preset's content (see the module docstring)."""
    if spec.preset is None:
        return spec
    preset = presets.get(spec.preset)
    if preset is None:
        known = ", ".join(sorted(presets)) or "none on this server"
        raise SpecError(f"{where}.preset: unknown preset {spec.preset!r} (known: {known})")
    if preset.experiment is not None:
        if spec.interventions:
            raise SpecError(f"{where}.interventions: preset {spec.preset!r} is the A/B experiment "
                            f"{preset.experiment!r}; interventions cannot be added to an experiment")
        return SteeringSpec(experiment=preset.experiment, unit=spec.unit)
    return SteeringSpec(interventions=[*preset.interventions, *spec.interventions])
